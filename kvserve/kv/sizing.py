"""How many bytes K/V take, and how many blocks a memory budget holds. Pure arithmetic.

The seeds' formula: a cache of `batch` sequences of `seq_len` tokens takes

    2 (K and V) x batch x layers x seq_len x kv_heads x head_dim x bytes per element

Llama-2-7B (32 layers, 32 KV heads, head_dim 128) in fp16 at batch 1 and 2048 tokens:
2 x 1 x 32 x 2048 x 32 x 128 x 2 = 1,073,741,824 bytes (1 GiB), i.e. 512 KiB per token.
"""

from __future__ import annotations

import math

# Bytes per stored element of each kv_cache_dtype (int4 packs two values in a byte); scales of
# quantized dtypes are extra and not counted here.
KV_DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "fp8_e4m3": 1,
    "int8": 1,
    "int4": 0.5,
}


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: float
) -> int:
    """Bytes of K and V one token takes over all layers: 2 x L x H x D x bytes.

    Args:
        dtype_bytes: bytes per element; fractional for sub-byte dtypes (0.5 for int4).

    Returns:
        Whole bytes, rounded up.

    Raises:
        ValueError: an argument is not positive.
    """
    _require_positive(
        num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes
    )
    return math.ceil(2 * num_layers * num_kv_heads * head_dim * dtype_bytes)


def kv_cache_bytes(
    batch_size: int,
    seq_len: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype_bytes: float,
) -> int:
    """Bytes of the K/V of `batch_size` sequences of `seq_len` tokens (the seeds' formula).

    Raises:
        ValueError: an argument is not positive.
    """
    _require_positive(batch_size=batch_size, seq_len=seq_len)
    _require_positive(
        num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes
    )
    return math.ceil(2 * batch_size * num_layers * seq_len * num_kv_heads * head_dim * dtype_bytes)


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
