"""Quantized KV caches in the whole engine: perplexity through the paged cache against
transformers, and greedy agreement of each dtype with `auto`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from kvserve.eval.perplexity import PplConfig, perplexity, top1_agreement
from kvserve.llm import LLM
from tests.helpers import assert_no_blocks_held, random_prompts

WINDOW = PplConfig(window_len=48, num_windows=4, batch_size=3)


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
    # A budget of 8 tokens a step: every window is scored through many prefill chunks.
    llm = LLM(str(path), num_kv_blocks=64, block_size=4, max_model_len=128,
              max_num_batched_tokens=8)  # fmt: skip
    result = perplexity(llm, tokens, WINDOW)
    assert result["num_scored_tokens"] == WINDOW.num_windows * (WINDOW.window_len - 1)
    assert result["mean_nll"] == pytest.approx(_hf_mean_nll(path, tokens, WINDOW), abs=1e-4)
    assert_no_blocks_held(llm.engine)


@pytest.mark.parametrize(
    ("kv_cache_dtype", "max_increase"),
    [("float16", 0.001), ("bfloat16", 0.01), ("int8", 0.01), ("fp8_e4m3", 0.05), ("int4", 0.1)],
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


@pytest.mark.parametrize(("kv_cache_dtype", "min_rate"), [("int8", 0.95), ("fp8_e4m3", 0.88)])
def test_top1_agreement_with_auto(
    tiny_checkpoints: dict[str, Path], kv_cache_dtype: str, min_rate: float
) -> None:
    """Teacher-forced greedy agreement: at each position of the same windows, does the
    quantized cache predict auto's next token? (A random model's logits have near-ties,
    so this is a harder test than a real model's; the default model's rate is in
    docs/benchmarks.md.)"""
    path = str(tiny_checkpoints["llama"])
    tokens = _tokens(WINDOW.window_len * WINDOW.num_windows)
    base = perplexity(LLM(path, num_kv_blocks=64, block_size=4), tokens, WINDOW)
    llm = LLM(path, num_kv_blocks=64, block_size=4, kv_cache_dtype=kv_cache_dtype)
    rate = top1_agreement(base, perplexity(llm, tokens, WINDOW))
    print(f"top-1 agreement {kv_cache_dtype} vs auto: {rate:.3f}")
    assert rate >= min_rate


def test_prefix_cache_keys_include_the_kv_dtype(tiny_checkpoints: dict[str, Path]) -> None:
    from kvserve.engine.engine import Engine

    hashes = {}
    for dtype in ("auto", "int8"):
        llm = LLM(str(tiny_checkpoints["llama"]), num_kv_blocks=32, kv_cache_dtype=dtype)
        engine: Engine = llm.engine
        hashes[dtype] = engine.kv_cache_manager.hash_extra_keys
    assert hashes["auto"] != hashes["int8"]
