"""Tiny random HF checkpoints, built with transformers and saved as safetensors.

Fixtures:
    tiny_checkpoints      session dict name -> folder, one per entry of TINY_CHECKPOINTS
    make_tiny_checkpoint  session factory: make_tiny_checkpoint(arch, tmp_path, **config_kwargs)
                          -> folder, arch in "llama", "mistral", "qwen2", "gpt2"
    redis_server, redis_url  a fresh real Redis per test (tests/redis_server.py)

Weights are drawn with a fixed seed and a larger scale than transformers' init (std 0.15, norm
weights near 1), so attention is peaked and logits differ by O(1): a masking or RoPE bug moves
them far beyond the 1e-4 parity tolerance. No tokenizer is saved (tests pass token ids).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.redis_server import RedisServer

_COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
BASE_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=8),
    "qwen2": dict(_COMMON, bos_token_id=1, eos_token_id=[2, 3]),
    "gpt2": dict(
        vocab_size=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=255,
        eos_token_id=255,
    ),  # fmt: skip
}
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)
# name -> (arch, config overrides, max_shard_size)
TINY_CHECKPOINTS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "llama": ("llama", {}, None),  # GQA 4:2, untied lm_head (TinyLlama shape)
    "llama_tied": (  # tied embeddings, rope theta 1e5 (SmolLM2 shape), plain MHA
        "llama",
        dict(tie_word_embeddings=True, num_key_value_heads=4, rope_theta=1e5),
        None,
    ),
    "llama_mqa": ("llama", dict(num_key_value_heads=1), "40KB"),  # MQA, sharded with an index
    "llama_head_dim": (  # head_dim 32 != 64 / 4, biases everywhere, llama3 RoPE scaling
        "llama",
        dict(head_dim=32, attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3_ROPE),
        None,
    ),
    "mistral": ("mistral", {}, None),  # sliding window 8
    "qwen2": ("qwen2", dict(tie_word_embeddings=True), None),  # qkv bias, tied
    "qwen2_swa": (  # layer 0 full attention, layer 1 sliding window 8
        "qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
        None,
    ),
    "gpt2": ("gpt2", {}, None),
}


def _hf_config(arch: str, **config_kwargs: Any) -> Any:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    classes["gpt2"] = GPT2Config
    if arch not in classes:
        raise ValueError(f"arch: one of {', '.join(classes)}, got {arch!r}")
    return classes[arch](**{**BASE_CONFIGS[arch], **config_kwargs})


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = param.ndim == 1 and ("norm" in name or "ln_" in name)
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.15 * noise)


def make_tiny_checkpoint(
    arch: str,
    tmp_path: Path,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_kwargs: Any,
) -> Path:
    """Save a tiny random `arch` model (with `config_kwargs` over the defaults) under
    `tmp_path` in a fresh folder and return that folder."""
    from transformers import AutoModelForCausalLM

    config = _hf_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    folder = Path(tempfile.mkdtemp(prefix=f"{arch}-", dir=tmp_path))
    model.save_pretrained(folder, max_shard_size=max_shard_size or "50GB")
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {
        name: make_tiny_checkpoint(arch, root, max_shard_size=shard, **kwargs)
        for name, (arch, kwargs, shard) in TINY_CHECKPOINTS.items()
    }


@pytest.fixture(scope="session", name="make_tiny_checkpoint")
def make_tiny_checkpoint_fixture() -> Callable[..., Path]:
    return make_tiny_checkpoint


@pytest.fixture(scope="session")
def hf_models(tiny_checkpoints: dict[str, str]) -> dict[str, torch.nn.Module]:
    """transformers' model of every tiny checkpoint (eager attention, fp32): the oracle."""
    from transformers import AutoModelForCausalLM

    return {
        name: AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        for name, path in tiny_checkpoints.items()
    }


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty Redis for one test (tests/redis_server.py); fails if none is installed."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
