"""`kvserve kv-size`: the seeds' KV formula with GQA, sliding windows and a memory budget.

Pure arithmetic on a model's shape (no torch). Per token, all layers:

    data    2 (K and V) x layers x kv_heads x head_dim x bytes per element
    scales  what a quantized dtype stores beside the data (`kv_scale_bytes_per_token`)

A layer with a sliding window of W keeps at most W tokens of a sequence, so a sequence of
`seq_len` tokens holds `min(seq_len, W)` tokens in such a layer and `seq_len` in the others.
With a memory budget, the weights come first (`num_params` x weight bytes); what is left
holds the KV cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from kvserve.kv.sizing import KV_DTYPE_BYTES

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


def kv_scale_bytes_per_token(
    kv_cache_dtype: str, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int = 16
) -> int:
    """Bytes of quantization scales per token, all layers, K and V (kv/quant.py's layout).

    - int8: one float32 scale per token per KV head, for K and for V.
    - int4 (KIVI-style, float16 scale and zero point per group): keys per channel, a group
      being one channel of one block's `block_size` tokens (4 x head_dim / block_size bytes
      a token); values per token in groups of 32 channels, or the whole head when it is
      smaller (4 x head_dim / 32 bytes).
    - fp8_e4m3: one scale per layer tensor, nothing per token.
    """
    if kv_cache_dtype == "int8":
        return 2 * num_layers * num_kv_heads * 4
    if kv_cache_dtype == "int4":
        per_head = 4 * head_dim / block_size + 4 * head_dim / min(32, head_dim)
        return math.ceil(num_layers * num_kv_heads * per_head)
    return 0


def kv_dtype_bytes(kv_cache_dtype: str, model_dtype: str) -> float:
    """Bytes per stored element; `auto` is the model's dtype."""
    dtype = model_dtype if kv_cache_dtype == "auto" else kv_cache_dtype
    if dtype not in KV_DTYPE_BYTES:
        choices = ", ".join(["auto", *KV_DTYPE_BYTES])
        raise ValueError(f"kv_cache_dtype: must be one of {choices}; got {kv_cache_dtype!r}")
    return KV_DTYPE_BYTES[dtype]


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
    element = kv_dtype_bytes(kv_cache_dtype, model_dtype)
    layers, kv_heads, head_dim = shape.num_layers, shape.num_kv_heads, shape.head_dim
    per_layer_data = 2 * kv_heads * head_dim * element  # bytes of one token in one layer
    per_layer_scales = kv_scale_bytes_per_token(kv_cache_dtype, 1, kv_heads, head_dim, block_size)
    held = [seq_len if w is None else min(seq_len, w) for w in shape.layer_windows]
    seq_bytes = math.ceil(sum(h * (per_layer_data + per_layer_scales) for h in held))
    data = math.ceil(layers * per_layer_data)
    scales = kv_scale_bytes_per_token(kv_cache_dtype, layers, kv_heads, head_dim, block_size)
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
