"""The KV cache as allocated holds exactly 2 x layers x kv_heads x head_dim x bytes per token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve.bench.offline import kv_bytes_per_token
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
    kv = kv_bytes_per_token(llm)
    assert kv["measured"] == kv["formula"] == 2 * num_layers * kv_heads * head_dim * 4
    caches = llm.engine.model_runner.kv_caches
    assert caches is not None and len(caches) == num_layers
    assert tuple(caches[0][0].shape) == (32, 16, kv_heads, head_dim)
