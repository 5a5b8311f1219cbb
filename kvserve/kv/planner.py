"""`kvserve kv-size`: the seeds' KV formula with GQA, sliding windows and a memory budget.

Pure arithmetic on a model's shape (no torch), through kv/sizing.py. Per token, all layers:

    data    2 (K and V) x layers x kv_heads x head_dim x bytes per element
    scales  what a quantized dtype stores beside the data (`sizing.scale_bytes_per_token`)

A layer with a sliding window of W keeps at most W tokens of a sequence, so a sequence of
`seq_len` tokens holds `min(seq_len, W)` tokens in such a layer and `seq_len` in the others.
With a memory budget, the weights come first (`num_params` x weight bytes); what is left
holds the KV cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from kvserve.kv.sizing import kv_bytes_per_token, kv_dtype_name, tokens_held

GIB = 1 << 30
# Bytes per weight element for the weights' dtype (`--weights-dtype`).
WEIGHT_DTYPE_BYTES: dict[str, float] = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What KV sizing needs to know about a model."""

    name: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    num_params: int
    max_position_embeddings: int
    layer_windows: tuple[int | None, ...] = ()  # per layer; empty = no sliding window

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
                     "num_params", "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(
                f"layer_windows: needs {self.num_layers} entries, got {len(self.layer_windows)}"
            )


def _preset(name: str, layers: int, heads: int, kv_heads: int, head_dim: int, params: int,
            max_pos: int, window: int | None = None) -> ModelShape:  # fmt: skip
    return ModelShape(name, layers, heads, kv_heads, head_dim, params, max_pos, (window,) * layers)


# Published shapes (each model's config.json); parameter counts from the model cards.
PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        _preset("Llama-2-7B", 32, 32, 32, 128, 6_738_415_616, 4096),
        _preset("Llama-2-70B", 80, 64, 8, 128, 68_976_648_192, 4096),
        _preset("Llama-3-8B", 32, 32, 8, 128, 8_030_261_248, 8192),
        _preset("Mistral-7B", 32, 32, 8, 128, 7_241_732_096, 32768, window=4096),  # v0.1
        _preset("Qwen2-7B", 28, 28, 4, 128, 7_615_616_512, 32768),
        _preset("SmolLM2-135M", 30, 9, 3, 64, 134_515_008, 8192),
    )
}


@dataclass(frozen=True)
class KVPlan:
    model: str
    kv_cache_dtype: str
    batch_size: int
    seq_len: int
    bytes_per_token: int  # K and V data plus scales, every layer, no window
    data_bytes_per_token: int
    scale_bytes_per_token: int
    tokens_held_per_seq: int  # summed over layers / num_layers: the window's effect
    kv_bytes_per_seq: int
    kv_bytes: int  # the whole batch
    weights_bytes: int
    memory_bytes: int | None
    free_bytes: int | None  # memory - weights
    max_tokens: int | None  # tokens of KV the free memory holds (no window)
    max_seqs: int | None  # sequences of seq_len the free memory holds (windows counted)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_kv(
    shape: ModelShape,
    batch_size: int = 1,
    seq_len: int = 2048,
    kv_cache_dtype: str = "auto",
    model_dtype: str = "float16",
    memory_gb: float | None = None,
    block_size: int = 16,
) -> KVPlan:
    """The KV size of `batch_size` sequences of `seq_len` tokens, and what a budget holds.

    Raises:
        ValueError: a non-positive size, an unknown dtype, weights larger than the budget.
    """
    for name, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("block_size", block_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if model_dtype not in WEIGHT_DTYPE_BYTES:
        raise ValueError(
            f"dtype: must be one of {', '.join(WEIGHT_DTYPE_BYTES)}; got {model_dtype!r}"
        )
    kv_dtype = kv_dtype_name(kv_cache_dtype, model_dtype)
    layers, kv_heads, head_dim = shape.num_layers, shape.num_kv_heads, shape.head_dim
    one_layer = kv_bytes_per_token(1, kv_heads, head_dim, kv_dtype, block_size).total
    held = tokens_held(seq_len, shape.layer_windows)
    seq_bytes = sum(held) * one_layer
    data, scales = kv_bytes_per_token(layers, kv_heads, head_dim, kv_dtype, block_size)
    weights = math.ceil(shape.num_params * WEIGHT_DTYPE_BYTES[model_dtype])
    memory = free = max_tokens = max_seqs = None
    if memory_gb is not None:
        if not memory_gb > 0:
            raise ValueError(f"memory_gb: must be positive, got {memory_gb!r}")
        memory = int(memory_gb * GIB)
        free = memory - weights
        if free <= 0:
            raise ValueError(
                f"memory_gb: {memory_gb:g} GiB does not hold the weights "
                f"({weights / GIB:.2f} GiB in {model_dtype})"
            )
        max_tokens = free // (data + scales)
        max_seqs = free // seq_bytes
    return KVPlan(
        model=shape.name, kv_cache_dtype=kv_cache_dtype, batch_size=batch_size,
        seq_len=seq_len, bytes_per_token=data + scales, data_bytes_per_token=data,
        scale_bytes_per_token=scales, tokens_held_per_seq=round(sum(held) / layers),
        kv_bytes_per_seq=seq_bytes, kv_bytes=batch_size * seq_bytes, weights_bytes=weights,
        memory_bytes=memory, free_bytes=free, max_tokens=max_tokens, max_seqs=max_seqs,
    )  # fmt: skip
