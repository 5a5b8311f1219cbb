"""Quantized KV caches in the whole engine: perplexity through the paged cache against
transformers, and greedy agreement of each dtype with `auto`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from kvserve.bench.perplexity import PplConfig, perplexity
from kvserve.llm import LLM
from kvserve.sampling_params import SamplingParams
from tests.helpers import assert_no_blocks_held, random_prompts

WINDOW = PplConfig(window_len=48, prefill_len=20, chunk_len=8, num_windows=4, batch_size=3)


def _tokens(count: int) -> list[int]:
    return random_prompts(256, [count], seed=7)[0]


def _hf_mean_nll(path: Path, token_ids: list[int], config: PplConfig) -> float:
    """Each window in one full forward, no cache: the oracle."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(config.num_windows):
            window = torch.tensor([token_ids[i * config.window_len : (i + 1) * config.window_len]])
            logits = model(window).logits[0, :-1]  # (W - 1, vocab)
            log_probs = torch.log_softmax(logits.float(), -1)
            nll -= float(log_probs.gather(1, window[0, 1:].unsqueeze(1)).sum())
            count += logits.shape[0]
    return nll / count


def test_auto_perplexity_through_chunks_and_decodes_equals_transformers(
    tiny_checkpoints: dict[str, Path],
) -> None:
    path = tiny_checkpoints["llama"]
    tokens = _tokens(WINDOW.window_len * WINDOW.num_windows + 5)
    llm = LLM(str(path), num_kv_blocks=64, block_size=4, max_model_len=128)
    result = perplexity(llm, tokens, WINDOW)
    assert result["num_scored_tokens"] == WINDOW.num_windows * (WINDOW.window_len - 1)
    assert result["mean_nll"] == pytest.approx(_hf_mean_nll(path, tokens, WINDOW), abs=1e-4)
    assert_no_blocks_held(llm.engine)


@pytest.mark.parametrize(
    ("kv_cache_dtype", "max_increase"),
    [("float16", 0.001), ("bfloat16", 0.01), ("int8", 0.01), ("fp8_e4m3", 0.05)],
)
def test_quantized_perplexity_stays_close_to_auto(
    tiny_checkpoints: dict[str, Path], kv_cache_dtype: str, max_increase: float
) -> None:
    """Relative perplexity change on a random model (peaked attention, O(1) logits)."""
    path = str(tiny_checkpoints["llama"])
    tokens = _tokens(WINDOW.window_len * WINDOW.num_windows)
    base = perplexity(LLM(path, num_kv_blocks=64, block_size=4), tokens, WINDOW)
    llm = LLM(path, num_kv_blocks=64, block_size=4, kv_cache_dtype=kv_cache_dtype)
    quantized = perplexity(llm, tokens, WINDOW)
    change = quantized["perplexity"] / base["perplexity"] - 1
    print(f"{kv_cache_dtype}: perplexity {quantized['perplexity']:.4f} vs {base['perplexity']:.4f}")
    assert quantized["perplexity"] != base["perplexity"]  # the cache really is quantized
    assert abs(change) < max_increase
    assert math.isfinite(quantized["mean_nll"])


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_greedy_agreement_with_auto(tiny_checkpoints: dict[str, Path], kv_cache_dtype: str) -> None:
    """Share of generated tokens equal to `auto`'s, up to each sequence's first difference
    (after it the contexts differ, so later tokens are no longer comparable)."""
    path = str(tiny_checkpoints["llama"])
    prompts = [{"prompt_token_ids": p} for p in random_prompts(256, [5, 17, 30, 9, 44, 23], seed=3)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    runs = {}
    for dtype in ("auto", kv_cache_dtype):
        llm = LLM(path, num_kv_blocks=128, block_size=4, kv_cache_dtype=dtype)
        runs[dtype] = [
            o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)
        ]
        assert_no_blocks_held(llm.engine)
    agreed = 0
    for ref, got in zip(runs["auto"], runs[kv_cache_dtype], strict=True):
        agreed += next(
            (i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), len(ref)
        )
    rate = agreed / sum(len(r) for r in runs["auto"])
    print(f"greedy agreement {kv_cache_dtype} vs auto: {rate:.3f}")
    assert rate >= 0.9


def test_prefix_cache_keys_include_the_kv_dtype(tiny_checkpoints: dict[str, Path]) -> None:
    from kvserve.engine.engine import Engine

    hashes = {}
    for dtype in ("auto", "int8"):
        llm = LLM(str(tiny_checkpoints["llama"]), num_kv_blocks=32, kv_cache_dtype=dtype)
        engine: Engine = llm.engine
        hashes[dtype] = engine.kv_cache_manager.hash_extra_keys
    assert hashes["auto"] != hashes["int8"]
