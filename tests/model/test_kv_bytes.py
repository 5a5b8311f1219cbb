"""The KV cache as allocated holds exactly 2 x layers x kv_heads x head_dim x bytes per token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve.bench.offline import measured_kv_bytes
from kvserve.llm import LLM


@pytest.mark.parametrize(
    ("name", "kv_heads", "head_dim"),
    [("llama", 2, 16), ("llama_mqa", 1, 16), ("llama_head_dim", 2, 32), ("gpt2", 4, 16)],
)
def test_measured_kv_bytes_per_token_equal_the_formula(
    tiny_checkpoints: dict[str, str], name: str, kv_heads: int, head_dim: int
) -> None:
    config = json.loads((Path(tiny_checkpoints[name]) / "config.json").read_text())
    num_layers = config.get("num_hidden_layers", config.get("n_layer"))
    llm = LLM(tiny_checkpoints[name], num_kv_blocks=32, max_model_len=128, block_size=16)
    kv = measured_kv_bytes(llm)
    assert kv["measured"] == kv["formula"] == 2 * num_layers * kv_heads * head_dim * 4
    caches = llm.engine.model_runner.kv_caches
    assert caches is not None and len(caches) == num_layers
    assert tuple(caches[0].k.shape) == (32, 16, kv_heads, head_dim)


# The tiny llama: 2 layers, 2 KV heads, head_dim 16; blocks of 16 tokens.
# data = 2 (K, V) x 2 x 2 x 16 x element bytes; scales:
#   int8: float32 per token per KV head, K and V: 2 x 2 x 2 x 4 = 32
#   int4: float16 scale + zero: K per channel per block (2 x 2 x 4 x 16 / 16 = 16),
#         V per token per group of min(32, 16) channels (2 x 2 x 4 x 16 / 16 = 16)
@pytest.mark.parametrize(
    ("kv_cache_dtype", "data_bytes", "scale_bytes"),
    [("float16", 256, 0), ("bfloat16", 256, 0), ("fp8_e4m3", 128, 0), ("int8", 128, 32),
     ("int4", 64, 32)],
)  # fmt: skip
def test_every_kv_dtype_allocates_what_the_formula_and_the_pool_count(
    tiny_checkpoints: dict[str, str], kv_cache_dtype: str, data_bytes: int, scale_bytes: int
) -> None:
    """Bytes per token as allocated = the formula = hand-computed; the pool's block count is
    the budget over those bytes."""
    per_token, block_size, budget = data_bytes + scale_bytes, 16, 1 << 20
    llm = LLM(
        tiny_checkpoints["llama"],
        kv_cache_memory_bytes=budget,
        kv_cache_dtype=kv_cache_dtype,
        max_model_len=128,
        block_size=block_size,
    )
    kv = measured_kv_bytes(llm)
    assert kv["measured"] == kv["formula"] == per_token
    assert kv["scale_bytes"] == scale_bytes
    caches = llm.engine.model_runner.kv_caches
    assert caches is not None and caches[0].k.shape[0] == budget // (block_size * per_token)
