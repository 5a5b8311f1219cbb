"""Fused decode attention: read the K/V blocks in place, compiled by inductor.

Gather + SDPA moves every cached byte three times (read, write the copy, read the copy),
and a decode step is memory-bound: at 64 seqs of ~400 tokens it is two thirds of the step
(docs/benchmarks.md). Written as elementwise products and reductions, inductor fuses the
block lookup into the loops that consume it, so K and V are each read once, where they lie,
and float16 / bfloat16 / float8 blocks are converted, int8 blocks dequantized, inside those
loops.
Compiled once with dynamic shapes (group size and block count vary every step), so it needs
the C++ toolchain that `--compile` needs and is used only with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kvserve.kv.quant import LayerKV

_FLOAT_CACHES = (torch.float32, torch.float16, torch.bfloat16)
_BYTE_CACHES = (torch.int8, torch.float8_e4m3fn)


def fused_reads(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused kernel reads caches of this storage dtype on this device.

    Float caches always. int8 (each value times its token's fp32 scale inside the loops) and
    float8_e4m3fn only where inductor's loops convert bytes to float32 quickly: not on a CPU
    without AVX-512, whose AVX2 code converts int8 lanes about 10x slower. One layer, 16 seqs
    x 320 tokens (scripts/byte_cache_attention.py): AVX-512 code reads int8 fused in 0.29 ms
    against 0.42 ms for gather + dequantize + SDPA and fp8 in 0.82 against 3.1 ms; AVX2 code
    (`cpp.simdlen` 256) takes 3.0 against 0.47 ms and 4.7 against 3.2 ms. Never int4: its
    packed nibbles and per-channel key scales have no reader here.
    """
    if dtype in _FLOAT_CACHES:
        return True
    if dtype not in _BYTE_CACHES:
        return False
    return device.type != "cpu" or _cpu_vectorizes_bytes()


def _cpu_vectorizes_bytes() -> bool:
    import torch._inductor.config as inductor_config

    simdlen = inductor_config.cpp.simdlen  # None: the widest the CPU has
    wide = simdlen is None or simdlen >= 512
    return wide and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _read(cache: Tensor, scale: Tensor | None, block_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """(n, m, block_size, kv_heads, head_dim) values of the blocks, in `dtype`, lazily: inside
    the compiled graph this is indexing that the consuming loops fuse, not a copy."""
    values = cache[block_ids].to(dtype)
    if scale is None:
        return values
    return values * scale[block_ids].unsqueeze(-1).to(dtype)  # int8: one scale per token, head


def _decode_reduction(
    q: Tensor,
    kv_cache: LayerKV,
    block_ids: Tensor,
    mask: Tensor,
    scale: float,
) -> Tensor:
    n, num_blocks = block_ids.shape
    _, block_size, kv_heads, head_dim = kv_cache.k.shape
    num_keys = num_blocks * block_size
    group = q.shape[1] // kv_heads  # query heads per KV head
    k = _read(kv_cache.k, kv_cache.k_scale, block_ids, q.dtype)  # (n, m, bs, kvh, hd)
    v = _read(kv_cache.v, kv_cache.v_scale, block_ids, q.dtype)  # (n, m, bs, kvh, hd)
    k = k.view(n, num_keys, kv_heads, 1, head_dim)
    v = v.view(n, num_blocks, block_size, kv_heads, 1, head_dim)
    q = q.view(n, 1, kv_heads, group, head_dim)
    scores = (q * k).sum(-1) * scale  # (n, num_keys, kv_heads, group)
    scores = scores.masked_fill(~mask.view(n, num_keys, 1, 1), float("-inf"))
    probs = scores.softmax(1).view(n, num_blocks, block_size, kv_heads, group, 1)
    # Summed within each block first, then over blocks: the block id is then fixed for a
    # whole inner loop (one lookup per block, not per key), ~2x faster than one flat sum.
    out = (probs * v).sum(2).sum(1)  # (n, kv_heads, group, head_dim)
    return out.view(n, kv_heads * group, head_dim)


_fused_reduction: Callable[..., Tensor] | None = None


def fused_decode_attention(
    q: Tensor, kv_cache: LayerKV, block_ids: Tensor, mask: Tensor, scale: float
) -> Tensor:
    """Decode attention straight from the block cache, compiled on first use.

    Args:
        q: (n, num_heads, head_dim), one query token per seq.
        kv_cache: one layer's cache, blocks (num_blocks, block_size, kv_heads, head_dim)
            in a dtype that `fused_reads`, with its scales for int8.
        block_ids: (n, m) each seq's blocks, padded.
        mask: (n, m * block_size) bool, True = attend; every row attends to at least one key.
        scale: softmax scale.

    Returns:
        (n, num_heads, head_dim).
    """
    global _fused_reduction
    if _fused_reduction is None:
        _fused_reduction = torch.compile(_decode_reduction)
    # Only the seq and block counts vary; the model's shapes stay constants (all-dynamic
    # shapes would also guard on chance equalities between them, such as n == num_heads).
    for tensor in (q, block_ids, mask):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    torch._dynamo.maybe_mark_dynamic(block_ids, 1)
    torch._dynamo.maybe_mark_dynamic(mask, 1)
    assert fused_reads(kv_cache.k.dtype, kv_cache.k.device), kv_cache.k.dtype
    return _fused_reduction(q, kv_cache, block_ids, mask, scale)


def dense(tensor: Tensor) -> Tensor:
    """`tensor` with row-major strides: the compiled kernel guards on strides, and
    `contiguous()` keeps any stride on a dimension of size 1 (a one-seq slice)."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= size
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)
