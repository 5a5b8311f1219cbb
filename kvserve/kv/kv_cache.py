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


BlockData = list[tuple[torch.Tensor | None, ...]]  # per layer: k, v, k_scale, v_scale of one block


def read_block(kv_caches: KVCaches, block_id: int) -> BlockData:
    """A copy of one block's K/V in every layer, scales included, on the CPU (a connector
    keeps it: a tier, a test's in-memory store)."""
    return [
        tuple(None if t is None else t[block_id].to("cpu", copy=True) for t in layer)
        for layer in kv_caches
    ]  # each tensor: (block_size, num_kv_heads, head_dim) or its scales' shape


def write_block(kv_caches: KVCaches, block_id: int, data: BlockData) -> None:
    """Write what `read_block` returned into block `block_id` of every layer.

    Raises:
        ValueError: `data` has another number of layers or tensors than the cache.
    """
    if len(data) != len(kv_caches):
        raise ValueError(f"data: {len(data)} layers, the cache has {len(kv_caches)}")
    for layer, saved in zip(kv_caches, data, strict=True):
        if len(saved) != len(layer):
            raise ValueError(f"data: {len(saved)} tensors in a layer, the cache has {len(layer)}")
        for tensor, block in zip(layer, saved, strict=True):
            if tensor is not None and block is not None:
                tensor[block_id].copy_(block)
