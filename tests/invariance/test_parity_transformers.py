"""Greedy tokens and top-5 logprobs of the whole engine equal transformers' on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvserve.sampling_params import SamplingParams
from tests.helpers import hf_greedy, make_engine, random_prompts, run_engine

NUM_NEW = 32
LENGTHS = [5, 17, 33, 2]


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoints: dict[str, str]) -> dict[str, torch.nn.Module]:
    return {
        name: AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        for name, path in tiny_checkpoints.items()
    }


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
