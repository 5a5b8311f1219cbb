"""KV storage formats: what each `kv_cache_dtype` stores per layer, how it writes and reads.

Quantize on write, dequantize on read, always block by block in the paged layout:

    kv_cache_dtype   data (num_blocks, block_size, kv_heads, head_dim)   beside the blocks
    auto             the model's dtype                                     -
    float32/16,bf16  that dtype, cast on write and on read                 -
    fp8_e4m3         float8_e4m3fn; one scale per layer tensor (1.0,       -
                     uncalibrated, as vLLM without scales): |x| > 448
                     saturates
    int8             int8, symmetric: x = q * s, q in [-127, 127]          K and V scale s, float32,
                                                                           (num_blocks, block_size,
                                                                           kv_heads): one per token
                                                                           per KV head
    int4             uint8, two values a byte (channels 2i, 2i+1 in the   float16 (scale, zero):
                     low, high nibble), asymmetric: x = q * s + z,         K per channel per block
                     q in [0, 15]; grouped as KIVI does:                   (num_blocks, 2, kvh, hd);
                     keys per channel (a group is one channel of one       V per token per group
                     block's tokens), values per token (groups of 32       (num_blocks, block_size,
                     channels)                                             kvh, hd / 32, 2)

int4 keys: a block's channel group gains a token at every decode step, so a write dequantizes
the blocks it touches, adds the new tokens, and requantizes those blocks over their filled
slots (offsets up to the last one written; blocks fill in order). KIVI keeps the newest
tokens in full precision instead; here they are requantized at most block_size times.

A scale lives at the same (block, offset) as its token, so everything that moves blocks
(copy-on-write, prefix sharing) moves scales with the same block ids. kv/sizing.py counts
the same bytes (`scale_bytes_per_token`), and the engine sizes its pool with them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kvserve.kv.sizing import INT4_VALUE_GROUP

INT8_MAX = 127
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448

PLAIN_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
QUANTIZED_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "int8": torch.int8,
    "int4": torch.uint8,  # packed pairs
}
INT4_MAX = 15


class LayerKV(NamedTuple):
    """One layer's cache. `k_scale`/`v_scale` are None unless the format keeps scales."""

    k: Tensor  # (num_blocks, block_size, kv_heads, head_dim)
    v: Tensor  # (num_blocks, block_size, kv_heads, head_dim)
    k_scale: Tensor | None = None  # int8: (num_blocks, block_size, kvh); int4: module doc
    v_scale: Tensor | None = None  # int8: as k_scale; int4: see the module doc


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element dtype of the data tensors; `auto` is the model's dtype."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in PLAIN_DTYPES:
        return PLAIN_DTYPES[kv_cache_dtype]
    if kv_cache_dtype in QUANTIZED_DTYPES:
        return QUANTIZED_DTYPES[kv_cache_dtype]
    choices = ", ".join(["auto", *PLAIN_DTYPES, *QUANTIZED_DTYPES])
    raise ValueError(f"kv_cache_dtype: must be one of {choices}; got {kv_cache_dtype!r}")


def has_scales(dtype: torch.dtype) -> bool:
    """Whether a layer in this storage dtype keeps scales beside its blocks."""
    return dtype in (torch.int8, torch.uint8)


def allocate_layer(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> LayerKV:
    """Zero-filled data (masked slots must dequantize to finite values) and unit scales."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if dtype == torch.uint8:
        return _allocate_int4(num_blocks, block_size, num_kv_heads, head_dim, device)
    k = torch.zeros(shape, dtype=dtype, device=device)
    v = torch.zeros(shape, dtype=dtype, device=device)
    if not has_scales(dtype):
        return LayerKV(k, v)
    scale_shape = (num_blocks, block_size, num_kv_heads)
    return LayerKV(
        k,
        v,
        torch.ones(scale_shape, dtype=torch.float32, device=device),
        torch.ones(scale_shape, dtype=torch.float32, device=device),
    )


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """(..., head_dim) float -> int8 values and (...) float32 scales, x ~= q * scale.

    Symmetric, one scale per row: scale = max|x| / 127, so the largest magnitude maps to
    +-127 exactly. An all-zero row gets scale 1 (and zeros), never a division by zero.
    """
    x = x.float()
    amax = x.abs().amax(dim=-1)  # (...)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))  # (...)
    q = torch.round(x / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def quantize_fp8(x: Tensor) -> Tensor:
    """float -> float8_e4m3fn, saturating at +-448 instead of overflowing to NaN."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize(data: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Stored values (..., head_dim) and their per-row scales (...) or None (every format
    but int4, which `dequantize_blocks` reads) -> `dtype` values."""
    values = data.to(dtype, copy=scale is not None)  # scaled: a private copy to scale
    if scale is None:
        return values
    # In place on the fresh copy `to` made: a second temporary as large as the gathered
    # blocks costs more than the multiply (int8, 16 seqs x 320 tokens: 1.2 ms vs 0.4 ms).
    return values.mul_(scale.unsqueeze(-1).to(dtype))


def write_layer(layer: LayerKV, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store new tokens' K/V, (num_tokens, kv_heads, head_dim), at their slots."""
    if slot_mapping.numel() == 0:
        return
    for data, scale, new in ((layer.k, layer.k_scale, k), (layer.v, layer.v_scale, v)):
        slots = data.view(-1, *data.shape[2:])  # (num_slots, kv_heads, head_dim)
        if data.dtype == torch.int8:
            assert scale is not None
            values, scales = quantize_int8(new)
            slots.index_copy_(0, slot_mapping, values)
            scale.view(-1, scale.shape[2]).index_copy_(0, slot_mapping, scales)
        elif data.dtype == torch.uint8:
            assert scale is not None
            if scale.dim() == 4:
                _write_int4_keys(data, scale, new, slot_mapping)
            else:
                _write_int4_values(data, scale, new, slot_mapping)
        elif data.dtype == torch.float8_e4m3fn:
            # index_copy_ has no float8 kernel on CPU: copy the bytes.
            bytes_view = slots.view(torch.uint8)
            bytes_view.index_copy_(0, slot_mapping, quantize_fp8(new).view(torch.uint8))
        else:
            slots.index_copy_(0, slot_mapping, new.to(data.dtype))


def read_blocks(
    data: Tensor, scale: Tensor | None, block_ids: Tensor, dtype: torch.dtype
) -> Tensor:
    """Dequantized copies of the blocks `block_ids` (any shape S): (*S, block_size, kvh, hd)."""
    flat = block_ids.reshape(-1)
    values = data.index_select(0, flat)  # (n, block_size, kv_heads, head_dim or hd / 2)
    scales = None if scale is None else scale.index_select(0, flat)
    out = dequantize_blocks(values, scales, dtype)  # (n, block_size, kv_heads, head_dim)
    return out.view(*block_ids.shape, *out.shape[1:])


def dequantize_blocks(data: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Whole blocks (n, block_size, kvh, ...) and their scales -> (n, block_size, kvh, hd)."""
    if data.dtype != torch.uint8:
        return dequantize(data, scale, dtype)
    assert scale is not None
    if scale.dim() == 4:  # int4 keys: (n, 2, kvh, hd), per channel over the block
        q = unpack_int4(data).to(dtype)  # (n, block_size, kvh, hd), a fresh tensor
        return q.mul_(scale[:, :1].to(dtype)).add_(scale[:, 1:].to(dtype))
    q = unpack_int4(data).to(dtype)  # int4 values: scale (n, block_size, kvh, groups, 2)
    grouped = q.view(*q.shape[:-1], scale.shape[-2], -1)  # (n, bs, kvh, groups, 32)
    grouped.mul_(scale[..., :1].to(dtype)).add_(scale[..., 1:].to(dtype))
    return q


# ---- int4 -------------------------------------------------------------------------------


def int4_value_group(head_dim: int) -> int:
    return min(INT4_VALUE_GROUP, head_dim)


def pack_int4(q: Tensor) -> Tensor:
    """(..., d) integers in [0, 15] -> (..., d / 2) uint8: channel 2i low nibble, 2i+1 high."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """(..., d / 2) uint8 -> (..., d) uint8 in [0, 15]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_int4(x: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit over `dim`: x ~= q * scale + zero, q in [0, 15].

    Returns q (as x's shape, uint8) and float16 scale and zero (x's shape with `dim` of size
    1); q is computed from the float16-rounded scale and zero, so dequantizing with the
    stored pair gives exactly the grid point chosen. A constant group gets scale 1.
    """
    x = x.float()
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((high - low) / INT4_MAX).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = low.to(torch.float16)
    q = torch.round((x - zero.float()) / scale.float()).clamp_(0, INT4_MAX)
    return q.to(torch.uint8), scale, zero


def _allocate_int4(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, device: torch.device
) -> LayerKV:
    group = int4_value_group(head_dim)
    if head_dim % group or head_dim % 2:
        raise ValueError(
            f"kv_cache_dtype: int4 needs an even head_dim divisible by {group}, got {head_dim}"
        )
    packed = (num_blocks, block_size, num_kv_heads, head_dim // 2)
    groups = head_dim // group
    k_scale = torch.zeros((num_blocks, 2, num_kv_heads, head_dim), dtype=torch.float16)
    v_scale = torch.zeros((num_blocks, block_size, num_kv_heads, groups, 2), dtype=torch.float16)
    k_scale[:, 0] = 1  # (scale 1, zero 0): unwritten slots read as zeros
    v_scale[..., 0] = 1
    return LayerKV(
        torch.zeros(packed, dtype=torch.uint8, device=device),
        torch.zeros(packed, dtype=torch.uint8, device=device),
        k_scale.to(device),
        v_scale.to(device),
    )


def _write_int4_values(data: Tensor, scale: Tensor, new: Tensor, slot_mapping: Tensor) -> None:
    groups = scale.shape[-2]
    grouped = new.float().view(*new.shape[:-1], groups, -1)  # (T, kvh, groups, 32)
    q, group_scale, zero = quantize_int4(grouped, dim=-1)
    slots = data.view(-1, *data.shape[2:])  # (num_slots, kvh, hd / 2)
    slots.index_copy_(0, slot_mapping, pack_int4(q.view(new.shape)))
    pairs = torch.cat((group_scale, zero), dim=-1)  # (T, kvh, groups, 2)
    scale.view(-1, *scale.shape[2:]).index_copy_(0, slot_mapping, pairs)


def _write_int4_keys(data: Tensor, scale: Tensor, new: Tensor, slot_mapping: Tensor) -> None:
    """Requantize every block the new tokens land in, over its filled slots."""
    block_size = data.shape[1]
    blocks, local = torch.unique(slot_mapping // block_size, return_inverse=True)  # (B,), (T,)
    offsets = slot_mapping % block_size  # (T,)
    current = dequantize_blocks(data[blocks], scale[blocks], torch.float32)  # (B, bs, kvh, hd)
    current[local, offsets] = new.float()
    filled = torch.zeros(len(blocks), dtype=torch.long, device=data.device)
    filled.scatter_reduce_(0, local, offsets + 1, reduce="amax")  # (B,) slots in use
    valid = torch.arange(block_size, device=data.device) < filled.unsqueeze(1)  # (B, bs)
    mask = valid.view(*valid.shape, 1, 1)
    big = torch.finfo(torch.float32).max
    low = torch.where(mask, current, big).amin(1, keepdim=True)  # (B, 1, kvh, hd)
    high = torch.where(mask, current, -big).amax(1, keepdim=True)
    block_scale = ((high - low) / INT4_MAX).to(torch.float16)
    block_scale = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
    zero = low.to(torch.float16)
    q = torch.round((current - zero.float()) / block_scale.float()).clamp_(0, INT4_MAX)
    q = torch.where(mask, q, torch.zeros_like(q))  # unfilled slots: finite, never attended
    data[blocks] = pack_int4(q)
    scale[blocks] = torch.cat((block_scale, zero), dim=1)  # (B, 2, kvh, hd)


def copy_layer_blocks(layer: LayerKV, src: Tensor, dst: Tensor) -> None:
    """Copy whole blocks src -> dst, data and scales alike."""
    for tensor in layer:
        if tensor is None:
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            tensor = tensor.view(torch.uint8)
        tensor[dst] = tensor[src]
