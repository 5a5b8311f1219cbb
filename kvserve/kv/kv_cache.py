"""The physical KV cache: per-layer key and value tensors addressed by slot.

    k_cache[layer]: (num_blocks, block_size, num_kv_heads, head_dim)
    slot = block_id * block_size + offset

Allocated once at start-up; the block bookkeeping (block_pool.py, kv_cache_manager.py) decides
which slots a request owns, the model runner writes them with `slot_mapping`.
"""

from __future__ import annotations

import torch

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """`auto` stores K/V in the model's compute dtype."""
    if kv_cache_dtype == "auto":
        return model_dtype
    return STORAGE_DTYPES[kv_cache_dtype]


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KVCaches:
    """Zero-filled caches: attention may read (masked) slots that were never written, and
    zeros keep those reads finite.

    Inference tensors (made under `torch.inference_mode`): only ever written inside it, and
    with no autograd view tracking, so a compiled kernel sees them alike from every caller.
    """
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    with torch.inference_mode():
        return _zero_caches(num_layers, shape, dtype, device)


def _zero_caches(
    num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> KVCaches:
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),  # (num_blocks, block_size, kvh, hd)
            torch.zeros(shape, dtype=dtype, device=device),  # (num_blocks, block_size, kvh, hd)
        )
        for _ in range(num_layers)
    ]


def copy_blocks(kv_caches: KVCaches, block_copies: list[tuple[int, int]]) -> None:
    """Copy whole blocks src -> dst in every layer (copy-on-write of shared blocks)."""
    if not block_copies:
        return
    src = torch.tensor([s for s, _ in block_copies], dtype=torch.long)  # (num_copies,)
    dst = torch.tensor([d for _, d in block_copies], dtype=torch.long)  # (num_copies,)
    for k_cache, v_cache in kv_caches:
        src_dev, dst_dev = src.to(k_cache.device), dst.to(k_cache.device)
        k_cache[dst_dev] = k_cache[src_dev]
        v_cache[dst_dev] = v_cache[src_dev]
