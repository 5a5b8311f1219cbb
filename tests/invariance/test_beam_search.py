"""Beam search equals transformers' `generate(num_beams=W, do_sample=False)` and shares blocks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvserve.engine.beam_search import BeamSearch
from kvserve.llm import LLM
from tests.helpers import assert_no_blocks_held, random_prompts

WIDTH = 4
MAX_TOKENS = 12


def hf_beams(path: str, prompt: list[int], width: int, max_tokens: int) -> list[list[int]]:
    """transformers' `width` best hypotheses, each cut after its eos (padding dropped)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=width,
            num_return_sequences=width,
            do_sample=False,
            length_penalty=1.0,
            max_new_tokens=max_tokens,
            pad_token_id=min(eos_ids),
        )
    beams = []
    for row in out[:, len(prompt) :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        beams.append(row[:cut])
    return beams


def make_llm(path: str, **engine_args: Any) -> LLM:
    engine_args.setdefault("num_kv_blocks", 256)
    engine_args.setdefault("max_model_len", 128)
    return LLM(path, **engine_args)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_beam_search_matches_transformers(tiny_checkpoints: dict[str, str], name: str) -> None:
    path = tiny_checkpoints[name]
    llm = make_llm(path, block_size=4)
    prompts = random_prompts(llm.engine.model_config.vocab_size, [6, 13], seed=3)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], WIDTH, MAX_TOKENS)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.prompt_token_ids == prompt
        ours = [s.token_ids for s in output.sequences]
        assert ours == hf_beams(path, prompt, WIDTH, MAX_TOKENS), name
        scores = [s.score for s in output.sequences]
        assert scores == sorted(scores, reverse=True)
    assert_no_blocks_held(llm.engine)


def test_beams_that_end_on_eos(make_tiny_checkpoint: Any, tmp_path: Any) -> None:
    """A model whose eos is a likely token, so hypotheses finish early and the heuristic runs."""
    probe = make_llm(make_tiny_checkpoint("llama", tmp_path, seed=1), block_size=4)
    (prompt,) = random_prompts(256, [7], seed=5)
    (first,) = probe.beam_search({"prompt_token_ids": prompt}, WIDTH, MAX_TOKENS, ignore_eos=True)
    likely = first.sequences[0].token_ids[2]  # the best beam's third token becomes eos
    path = make_tiny_checkpoint("llama", tmp_path, seed=1, eos_token_id=likely)
    llm = make_llm(path, block_size=4)
    (output,) = llm.beam_search({"prompt_token_ids": prompt}, WIDTH, MAX_TOKENS)
    ours = [s.token_ids for s in output.sequences]
    assert any(s.finish_reason == "stop" for s in output.sequences)
    assert ours == hf_beams(str(path), prompt, WIDTH, MAX_TOKENS)


def test_beams_share_blocks_and_survive_a_tight_pool(tiny_checkpoints: dict[str, str]) -> None:
    path = tiny_checkpoints["llama"]
    prompts = random_prompts(256, [40, 9, 25], seed=9)
    roomy = make_llm(path, block_size=4)
    expected = roomy.beam_search([{"prompt_token_ids": p} for p in prompts], WIDTH, MAX_TOKENS)
    # 3 prompts x 4 beams x up to 13 blocks would need ~150 blocks unshared
    tight = make_llm(path, block_size=4, num_kv_blocks=40, max_model_len=64)
    engine = tight.engine
    peak = [0]
    step_model = engine.step_model

    def checked_step() -> Any:
        result = step_model()
        engine.scheduler.check_invariants()
        peak[0] = max(peak[0], engine.kv_cache_manager.num_used_blocks)
        return result

    engine.step_model = checked_step  # type: ignore[method-assign]
    got = tight.beam_search([{"prompt_token_ids": p} for p in prompts], WIDTH, MAX_TOKENS)
    assert [[s.token_ids for s in o.sequences] for o in got] == [
        [s.token_ids for s in o.sequences] for o in expected
    ]
    assert peak[0] <= 39
    assert_no_blocks_held(engine)


def test_beam_search_bad_arguments(tiny_checkpoints: dict[str, str]) -> None:
    llm = make_llm(tiny_checkpoints["llama"], max_num_seqs=4)
    prompt = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError, match="beam_width"):
        llm.beam_search(prompt, 0, 4)
    with pytest.raises(ValueError, match="beam_width"):
        llm.beam_search(prompt, 5, 4)
    with pytest.raises(ValueError, match="beam_width: at most 10"):
        make_llm(tiny_checkpoints["llama"], max_num_seqs=16).beam_search(prompt, 11, 4)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.beam_search(prompt, 2, 0)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.beam_search(prompt, 2, 200)
    with pytest.raises(ValueError, match="length_penalty"):
        llm.beam_search(prompt, 2, 4, length_penalty=float("nan"))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.beam_search({"prompt_token_ids": [999]}, 2, 4)
    llm.engine.add_request("busy", prompt, llm_params())
    with pytest.raises(RuntimeError, match="idle"):
        BeamSearch(llm.engine, 2, 4)
    llm.engine.abort_request("busy")
    assert_no_blocks_held(llm.engine)


def llm_params() -> Any:
    from kvserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=2)
