"""How many bytes K/V take, and how many blocks a memory budget holds. Pure arithmetic.

The one sizing path: the engine sizes its pool, `kvserve kv-size` plans and the benchmarks
check the allocated tensors with these functions. The seeds' formula: a cache of `batch`
sequences of `seq_len` tokens takes

    2 (K and V) x batch x layers x seq_len x kv_heads x head_dim x bytes per element

Llama-2-7B (32 layers, 32 KV heads, head_dim 128) in fp16 at batch 1 and 2048 tokens:
2 x 1 x 32 x 2048 x 32 x 128 x 2 = 1,073,741,824 bytes (1 GiB), i.e. 512 KiB per token.
Quantized dtypes add their scales (kv/quant.py's layout, per token per layer):

    int8   one float32 scale per token per KV head, for K and for V:   2 x 4 x kv_heads
    int4   float16 scale and zero point; keys per channel of a block (4 x head_dim /
           block_size a token), values per token in groups of 32 channels or the whole
           head when smaller (4 x head_dim / group):  kv_heads x (both)
    fp8    one scale per layer tensor: nothing per token
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

# Bytes per stored element of each kv_cache_dtype (int4 packs two values in a byte); scales of
# quantized dtypes are extra (`scale_bytes_per_token`).
KV_DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "fp8_e4m3": 1,
    "int8": 1,
    "int4": 0.5,
}
INT4_VALUE_GROUP = 32  # channels per int4 value group (the whole head when head_dim is smaller)


class KVBytes(NamedTuple):
    """Bytes one token's K/V take: the elements and the quantization scales beside them."""

    data: int
    scales: int

    @property
    def total(self) -> int:
        return self.data + self.scales


def kv_dtype_name(kv_cache_dtype: str, model_dtype: str) -> str:
    """The stored dtype's name: `auto` is the model's dtype.

    Raises:
        ValueError: not a KV dtype (names `kv_cache_dtype`).
    """
    dtype = model_dtype if kv_cache_dtype == "auto" else kv_cache_dtype
    if dtype not in KV_DTYPE_BYTES:
        choices = ", ".join(["auto", *KV_DTYPE_BYTES])
        raise ValueError(f"kv_cache_dtype: must be one of {choices}; got {kv_cache_dtype!r}")
    return dtype


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: str, block_size: int = 16
) -> KVBytes:
    """Bytes of K and V one token takes over `num_layers` layers, scales included.

    Args:
        kv_dtype: a stored dtype name (`kv_dtype_name` resolves `auto`).
        block_size: tokens per block (int4 keys keep one scale per channel per block).

    Returns:
        Whole bytes, each part rounded up.

    Raises:
        ValueError: an argument is not positive, or the dtype is unknown.
    """
    _require_positive(
        num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size
    )
    if kv_dtype not in KV_DTYPE_BYTES:
        choices = ", ".join(KV_DTYPE_BYTES)
        raise ValueError(f"kv_cache_dtype: must be one of {choices}; got {kv_dtype!r}")
    data = 2 * num_layers * num_kv_heads * head_dim * KV_DTYPE_BYTES[kv_dtype]
    scales = num_layers * scale_bytes_per_token(kv_dtype, num_kv_heads, head_dim, block_size)
    return KVBytes(math.ceil(data), math.ceil(scales))


def scale_bytes_per_token(
    kv_dtype: str, num_kv_heads: int, head_dim: int, block_size: int
) -> float:
    """Bytes of quantization scales one token adds in one layer, K and V (module doc)."""
    if kv_dtype == "int8":
        return 2 * 4 * num_kv_heads
    if kv_dtype == "int4":
        keys = 2 * 2 * head_dim / block_size  # fp16 scale and zero per channel per block
        values = 2 * 2 * head_dim / min(INT4_VALUE_GROUP, head_dim)  # fp16 scale, zero a group
        return num_kv_heads * (keys + values)
    return 0


def tokens_held(seq_len: int, layer_windows: Sequence[int | None]) -> list[int]:
    """Tokens of a `seq_len` sequence each layer keeps: a sliding window of W keeps W."""
    return [seq_len if window is None else min(seq_len, window) for window in layer_windows]


def num_blocks_for_bytes(memory_bytes: int, block_size: int, bytes_per_token: int) -> int:
    """How many whole blocks of `block_size` tokens fit in `memory_bytes` (rounded down).

    The count includes the null block 0 that the block pool reserves (see `block_pool`).

    Raises:
        ValueError: an argument is not positive.
    """
    _require_positive(
        memory_bytes=memory_bytes, block_size=block_size, bytes_per_token=bytes_per_token
    )
    return memory_bytes // (block_size * bytes_per_token)


def _require_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name}: must be positive, got {value!r}")
