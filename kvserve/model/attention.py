"""Paged attention in plain torch: write the new K/V into the block cache, attend with SDPA.

Cache layout (DESIGN.md §3), per layer: K and V of shape
(num_blocks, block_size, num_kv_heads, head_dim). Token t of a sequence sits in slot
`block_table[t // block_size] * block_size + t % block_size`. The cache keeps
`num_kv_heads` heads; SDPA's `enable_gqa` shares them among the query heads, nothing repeats them.

The flat batch holds the decode seqs first (one token each), then prefill chunks:

    rows:  [ d0 d1 .. d(nd-1) | p0 p0 p0 | p1 p1 .. p1 ]
             num_decodes        query_start_loc[i] .. query_start_loc[i+1]

A chunk of q_len tokens of a seq whose context after the step is seq_len holds positions
[seq_len - q_len, seq_len); query row r (position p = seq_len - q_len + r) sees the keys
j with p - sliding_window < j <= p (the causal mask aligned to the bottom right).

Masked-out slots (block padding, stale blocks out of the window) still meet a zero weight in
SDPA, and 0 * NaN is NaN: the caches must hold finite values, so allocate them with zeros.

Everything derived from the metadata (masks, block indices) is built once per step by
`plan_attention` and shared by every layer with the same sliding window.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kvserve.kernels import paged_decode_attention
from kvserve.kv.quant import LayerKV, read_blocks, write_layer
from kvserve.model.fused_attention import dense, fused_decode_attention, fused_reads

KVCache = LayerKV  # one layer's K/V blocks (and scales when quantized), kv/quant.py


@dataclass
class AttentionMetadata:
    """Per-step batch layout, built by the model runner once per step from Python lists."""

    query_start_loc: list[int]  # num_seqs + 1 cumulative query lengths
    seq_lens: list[int]  # per seq: context length after this step
    num_decodes: int  # seqs [0, num_decodes) have query length 1 and come first
    slot_mapping: Tensor | None  # (num_tokens,) int64 cache slot of each new token
    block_tables: Tensor | None  # (num_seqs, max_blocks_per_seq) int64, padded with 0
    block_size: int
    fused_decode: bool = False  # decode attention through the compiled kernel (see below)
    decode_kernel: bool = False  # decode attention through kvserve's C++ kernel (kernels/)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


class DecodeGroup(NamedTuple):
    """Decode seqs of similar context length, attended in one batched SDPA call."""

    rows: Tensor | None  # (g,) their rows among the decodes; None = all rows, in order
    block_ids: Tensor  # (g, max_blocks): padded to the group's longest context
    mask: Tensor  # (g, 1, 1, max_blocks * block_size) bool, True = attend


class DecodeKernelPlan(NamedTuple):
    """Every decode seq in one call of the C++ kernel, which walks each seq's own blocks."""

    block_table: Tensor  # (num_decodes, width) int64, contiguous
    seq_lens: list[int]
    window: int | None


class DecodePlan(NamedTuple):
    """The decode seqs, grouped by context length so short ones are not padded to long ones.

    Gathering K/V and attending are memory-bound: a batch padded to its longest context
    moves every padded slot too. Sorted by length, a new group starts when a context is
    below DECODE_GROUP_RATIO of its group's longest by at least DECODE_GROUP_MIN_GAP blocks.
    The C++ kernel needs no groups: it reads each seq's blocks and no padding.
    """

    num_decodes: int
    groups: list[DecodeGroup]
    fused: bool  # attend with `fused_decode_attention` instead of gather + SDPA
    kernel: DecodeKernelPlan | None = None  # attend with kernels.paged_decode_attention


DECODE_GROUP_RATIO = 0.9
DECODE_GROUP_MIN_GAP = 4  # blocks; below this, padding costs less than another call


class SeqPlan(NamedTuple):
    """One seq attended alone: a prefill chunk, or any seq when there is no cache."""

    start: int  # rows [start, end) of the flat batch
    end: int
    seq_len: int
    block_ids: Tensor | None  # (ceil(seq_len / block_size),) None without a cache
    mask: Tensor | None  # (q_len, seq_len) bool, True = attend; None = plain causal


class AttentionPlan(NamedTuple):
    """What every layer with one sliding window needs for this step."""

    slot_mapping: Tensor | None  # (num_tokens,) None without a cache
    decode: DecodePlan | None
    seqs: list[SeqPlan]


def plan_attention(
    md: AttentionMetadata, sliding_window: int | None, cached: bool, device: torch.device
) -> AttentionPlan:
    """Turn the step's metadata into masks and block indices, once for all layers.

    Without a cache (`cached` False) every seq attends causally among its new tokens only.
    """
    if not cached:
        seqs = [_plan_seq(md, i, sliding_window, False, device) for i in range(md.num_seqs)]
        return AttentionPlan(None, None, seqs)
    decode = _plan_decodes(md, sliding_window, device) if md.num_decodes else None
    seqs = [
        _plan_seq(md, i, sliding_window, True, device) for i in range(md.num_decodes, md.num_seqs)
    ]
    return AttentionPlan(md.slot_mapping, decode, seqs)


def _plan_decodes(md: AttentionMetadata, window: int | None, device: torch.device) -> DecodePlan:
    n = md.num_decodes
    if md.decode_kernel:
        assert md.block_tables is not None, "a cached step needs block_tables"
        kernel = DecodeKernelPlan(dense(md.block_tables[:n]), md.seq_lens[:n], window)
        return DecodePlan(n, [], False, kernel)
    num_blocks = [-(-seq_len // md.block_size) for seq_len in md.seq_lens[:n]]
    groups: list[list[int]] = []
    for row in sorted(range(n), key=lambda r: -num_blocks[r]):
        longest = num_blocks[groups[-1][0]] if groups else 0
        gap = longest - num_blocks[row]
        if groups and (
            num_blocks[row] >= DECODE_GROUP_RATIO * longest or gap < DECODE_GROUP_MIN_GAP
        ):
            groups[-1].append(row)
        else:
            groups.append([row])
    if len(groups) == 1:
        group = _decode_group(md, list(range(n)), None, window, device)
        return DecodePlan(n, [group], md.fused_decode)
    plans = [
        _decode_group(md, rows, torch.tensor(rows, device=device), window, device)
        for rows in groups
    ]
    return DecodePlan(n, plans, md.fused_decode)


def _decode_group(
    md: AttentionMetadata,
    rows: list[int],
    row_ids: Tensor | None,
    window: int | None,
    device: torch.device,
) -> DecodeGroup:
    assert md.block_tables is not None, "a cached step needs block_tables"
    lens = [md.seq_lens[row] for row in rows]
    max_blocks = -(-max(lens) // md.block_size)
    seq_lens = torch.tensor(lens, device=device).unsqueeze(1)  # (g, 1)
    key_pos = torch.arange(max_blocks * md.block_size, device=device)  # (max_keys,)
    mask = key_pos < seq_lens  # (g, max_keys)
    if window is not None:
        mask &= key_pos >= seq_lens - window  # (g, max_keys)
    table = md.block_tables if row_ids is None else md.block_tables[row_ids]
    block_ids = table[: len(rows), :max_blocks]  # (g, max_blocks)
    return DecodeGroup(row_ids, block_ids, mask.view(len(rows), 1, 1, -1))


def _plan_seq(
    md: AttentionMetadata, i: int, window: int | None, cached: bool, device: torch.device
) -> SeqPlan:
    start, end = md.query_start_loc[i], md.query_start_loc[i + 1]
    seq_len = md.seq_lens[i] if cached else end - start
    block_ids = None
    if cached:
        assert md.block_tables is not None, "a cached step needs block_tables"
        block_ids = md.block_tables[i, : -(-seq_len // md.block_size)]  # (num_blocks,)
    q_len = end - start
    mask = None
    if window is not None or q_len != seq_len:
        mask = causal_mask(q_len, seq_len, window, device)  # (q_len, seq_len)
    return SeqPlan(start, end, seq_len, block_ids, mask)


def causal_mask(q_len: int, k_len: int, window: int | None, device: torch.device) -> Tensor:
    """Bottom-right aligned causal mask: query r sits at position k_len - q_len + r."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)  # (q_len, 1)
    k_pos = torch.arange(k_len, device=device)  # (k_len,)
    mask = k_pos <= q_pos  # (q_len, k_len)
    if window is not None:
        mask &= k_pos > q_pos - window  # (q_len, k_len)
    return mask


def write_kv(k: Tensor, v: Tensor, kv_cache: KVCache, slot_mapping: Tensor) -> None:
    """Store the new tokens' K/V (num_tokens, num_kv_heads, head_dim) at their slots,
    quantized to the cache's format."""
    write_layer(kv_cache, k, v, slot_mapping)


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_cache: KVCache | None, plan: AttentionPlan, scale: float
) -> Tensor:
    """Attention of one layer for the whole flat batch.

    Args:
        q: (num_tokens, num_heads, head_dim) queries, RoPE applied.
        k, v: (num_tokens, num_kv_heads, head_dim) the new tokens' keys and values.
        kv_cache: this layer's cache, or None to attend among new tokens only.
        plan: from `plan_attention` for this layer's sliding window.
        scale: softmax scale, usually head_dim ** -0.5.

    Returns:
        (num_tokens, num_heads, head_dim) attention output, rows in batch order.
    """
    if kv_cache is not None:
        assert plan.slot_mapping is not None, "a cached step needs slot_mapping"
        write_kv(k, v, kv_cache, plan.slot_mapping)
    outputs = []
    if plan.decode is not None:
        assert kv_cache is not None, "decode seqs need a cache"
        outputs.append(
            _decode_attention(q[: plan.decode.num_decodes], kv_cache, plan.decode, scale)
        )
    for seq in plan.seqs:
        if kv_cache is None:
            keys, values = k[seq.start : seq.end], v[seq.start : seq.end]  # (q_len, kv_heads, hd)
        else:
            keys = _gather(kv_cache.k, kv_cache.k_scale, seq, q.dtype)  # (seq_len, kvh, hd)
            values = _gather(kv_cache.v, kv_cache.v_scale, seq, q.dtype)  # (seq_len, kvh, hd)
        outputs.append(_seq_attention(q[seq.start : seq.end], keys, values, seq.mask, scale))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (num_tokens, heads, hd)


def _gather(cache: Tensor, scale: Tensor | None, seq: SeqPlan, dtype: torch.dtype) -> Tensor:
    assert seq.block_ids is not None
    blocks = read_blocks(cache, scale, seq.block_ids, dtype)  # (num_blocks, bs, kvh, hd)
    return blocks.flatten(0, 1)[: seq.seq_len]  # (seq_len, kv_heads, head_dim)


def _seq_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, num_heads, q_len, head_dim)
        k.transpose(0, 1).unsqueeze(0),  # (1, num_kv_heads, seq_len, head_dim)
        v.transpose(0, 1).unsqueeze(0),  # (1, num_kv_heads, seq_len, head_dim)
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )  # (1, num_heads, q_len, head_dim)
    return out[0].transpose(0, 1)  # (q_len, num_heads, head_dim)


def _decode_attention(q: Tensor, kv_cache: KVCache, plan: DecodePlan, scale: float) -> Tensor:
    """q: (num_decodes, num_heads, head_dim) -> the same shape: one kernel call, or one
    SDPA / fused call per group."""
    if plan.kernel is not None:
        return paged_decode_attention(
            dense(q), kv_cache, *plan.kernel, scale
        )  # (num_decodes, num_heads, head_dim)
    fused = plan.fused and fused_reads(kv_cache.k.dtype, kv_cache.k.device)
    attend = _fused_group_attention if fused else _decode_group_attention
    if len(plan.groups) == 1 and plan.groups[0].rows is None:
        return attend(q, kv_cache, plan.groups[0], scale)
    out = torch.empty_like(q)  # (num_decodes, num_heads, head_dim)
    for group in plan.groups:
        assert group.rows is not None
        q_group = q.index_select(0, group.rows)  # (g, num_heads, head_dim)
        out.index_copy_(0, group.rows, attend(q_group, kv_cache, group, scale))
    return out


def _decode_group_attention(
    q: Tensor, kv_cache: KVCache, group: DecodeGroup, scale: float
) -> Tensor:
    n = q.shape[0]
    # (n, max_blocks, block_size, kv_heads, head_dim) dequantized copies
    k = read_blocks(kv_cache.k, kv_cache.k_scale, group.block_ids, q.dtype)
    v = read_blocks(kv_cache.v, kv_cache.v_scale, group.block_ids, q.dtype)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # (n, num_heads, 1, head_dim)
        k.view(n, -1, *k.shape[3:]).transpose(1, 2),  # (n, kv_heads, max_keys, head_dim)
        v.view(n, -1, *v.shape[3:]).transpose(1, 2),  # (n, kv_heads, max_keys, head_dim)
        attn_mask=group.mask,
        scale=scale,
        enable_gqa=True,
    )  # (n, num_heads, 1, head_dim)
    return out.squeeze(2)  # (n, num_heads, head_dim)


def _fused_group_attention(
    q: Tensor, kv_cache: KVCache, group: DecodeGroup, scale: float
) -> Tensor:
    mask = group.mask.view(q.shape[0], -1)  # (n, max_keys): one rank for every call
    block_ids = dense(group.block_ids)  # (n, max_blocks); a slice of the block table
    return fused_decode_attention(dense(q), kv_cache, block_ids, mask, scale)


# ---- torch.compile: attention as one opaque op --------------------------------------------


class AttentionStep(NamedTuple):
    """One forward's per-layer plans and caches, for the opaque op below."""

    plans: list[AttentionPlan]
    kv_caches: list[KVCache] | None


_ACTIVE_STEPS: list[AttentionStep] = []


@contextmanager
def attention_step(plans: list[AttentionPlan], kv_caches: list[KVCache] | None) -> Iterator[None]:
    """Make one forward's plans and caches visible to `kvserve::attention`.

    A compiled graph must not see the step's variable-shape metadata (every new shape would
    recompile it) nor the cache tensors (functionalization may copy mutated inputs), so a
    compiled forward calls the opaque op with only (q, k, v, layer_idx, scale) and the op finds
    the rest here. Only the model runner enters this, around exactly one forward; eager
    forwards pass plans and caches explicitly and never read it.
    """
    _ACTIVE_STEPS.append(AttentionStep(plans, kv_caches))
    try:
        yield
    finally:
        _ACTIVE_STEPS.pop()


@torch.library.custom_op("kvserve::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, layer_idx: int, scale: float) -> Tensor:
    step = _ACTIVE_STEPS[-1]
    kv_cache = None if step.kv_caches is None else step.kv_caches[layer_idx]
    out = paged_attention(q, k, v, kv_cache, step.plans[layer_idx], scale)  # (T, heads, hd)
    return out.contiguous()


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, layer_idx: int, scale: float) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)  # (T, heads, hd)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: KVCache | None,
    plan: AttentionPlan | None,
    scale: float,
    layer_idx: int,
) -> Tensor:
    """A layer's attention: explicit plan (eager), or `plan=None` inside `attention_step`."""
    if plan is None:
        out: Tensor = _attention_op(q, k, v, layer_idx, scale)  # (T, num_heads, head_dim)
        return out
    return paged_attention(q, k, v, kv_cache, plan, scale)  # (T, num_heads, head_dim)
