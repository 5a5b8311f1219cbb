"""The physical KV cache: per-layer key and value tensors addressed by slot.

    kv_caches[layer].k, .v: (num_blocks, block_size, num_kv_heads, head_dim)
    kv_caches[layer].k_scale, .v_scale: per-token scales of quantized dtypes (quant.py)
    slot = block_id * block_size + offset

Allocated once at start-up; the block bookkeeping (block_pool.py, kv_cache_manager.py) decides
which slots a request owns, the model runner writes them with `slot_mapping`.
"""

from __future__ import annotations

import torch

from kvserve.kv.quant import LayerKV, allocate_layer, copy_layer_blocks

KVCaches = list[LayerKV]


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KVCaches:
    """Zero-filled caches (with unit scales for int8, see quant.py): attention may read
    (masked) slots that were never written, and zeros keep those reads finite.

    Inference tensors (made under `torch.inference_mode`): only ever written inside it, and
    with no autograd view tracking, so a compiled kernel sees them alike from every caller.
    """
    with torch.inference_mode():
        return [
            allocate_layer(num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
            for _ in range(num_layers)
        ]


def copy_blocks(kv_caches: KVCaches, block_copies: list[tuple[int, int]]) -> None:
    """Copy whole blocks src -> dst in every layer (copy-on-write of shared blocks)."""
    if not block_copies:
        return
    src = torch.tensor([s for s, _ in block_copies], dtype=torch.long)  # (num_copies,)
    dst = torch.tensor([d for _, d in block_copies], dtype=torch.long)  # (num_copies,)
    for layer in kv_caches:
        device = layer.k.device
        copy_layer_blocks(layer, src.to(device), dst.to(device))
