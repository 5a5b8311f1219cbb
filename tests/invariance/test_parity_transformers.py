"""Greedy tokens and top-5 logprobs of the whole engine equal transformers' on tiny models."""

from __future__ import annotations

import pytest
import torch

from kvserve.sampling_params import SamplingParams
from tests.helpers import hf_greedy, make_engine, random_prompts, run_engine

NUM_NEW = 32
LENGTHS = [5, 17, 33, 2]


@pytest.mark.parametrize("block_size", [16])
def test_greedy_and_logprobs_match_transformers(
    tiny_checkpoints: dict[str, str], hf_models: dict[str, torch.nn.Module], block_size: int
) -> None:
    for name, path in tiny_checkpoints.items():
        engine = make_engine(path, block_size=block_size)
        prompts = random_prompts(engine.model_config.vocab_size, LENGTHS, seed=1)
        params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=5)
        outputs = run_engine(engine, prompts, params)
        for prompt, output in zip(prompts, outputs, strict=True):
            expected_ids, expected_rows = hf_greedy(hf_models[name], prompt, NUM_NEW)
            completion = output.outputs[0]
            assert completion.token_ids == expected_ids, f"{name}: greedy tokens differ"
            assert completion.logprobs is not None
            for step, (entry, row) in enumerate(
                zip(completion.logprobs, expected_rows, strict=True)
            ):
                top = torch.topk(row, 5)
                for token_id, logprob in zip(
                    top.indices.tolist(), top.values.tolist(), strict=True
                ):
                    assert token_id in entry, f"{name} step {step}: top-5 token {token_id} missing"
                    assert entry[token_id].logprob == pytest.approx(logprob, abs=1e-3)


def test_sliding_window_generation_4x_the_window_matches_and_holds_o_window_blocks(
    tiny_checkpoints: dict[str, str], hf_models: dict[str, torch.nn.Module]
) -> None:
    """Mistral, window 8, blocks of 4: 32 new tokens (4x the window) equal transformers',
    and from its first decode step on, each request holds at most ceil((8 + 4 - 1 + 1) / 4)
    = 3 real blocks (kv_cache_manager.py's bound), however long it grows."""
    from kvserve.kv.block_pool import NULL_BLOCK_ID

    engine = make_engine(tiny_checkpoints["mistral"], block_size=4)
    assert engine.model_config.sliding_window == 8
    prompts = random_prompts(engine.model_config.vocab_size, [5, 17], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"w{i}", {"prompt_token_ids": prompt}, params)
    outputs: dict[str, list[int]] = {}
    most_held = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.outputs[0].token_ids
        engine.scheduler.check_invariants()
        for request in engine.scheduler.running:
            # blocks are dropped when a step is scheduled: count from the first decode step on
            if request.num_computed_tokens > request.num_prompt_tokens:
                ids = engine.kv_cache_manager.get_block_ids(request.request_id)
                most_held = max(most_held, sum(1 for b in ids if b != NULL_BLOCK_ID))
    assert 0 < most_held <= 3
    assert engine.kv_cache_manager.num_used_blocks == 0
    for i, prompt in enumerate(prompts):
        expected, _ = hf_greedy(hf_models["mistral"], prompt, NUM_NEW)
        assert outputs[f"w{i}"] == expected
