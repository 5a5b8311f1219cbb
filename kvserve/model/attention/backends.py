"""Attention backends: how the rows of a step read the block cache and attend.

Cache layout (DESIGN.md §3), per layer: K and V of shape
(num_blocks, block_size, num_kv_heads, head_dim). Token t of a sequence sits in slot
`block_table[t // block_size] * block_size + t % block_size`. The cache keeps
`num_kv_heads` heads; SDPA's `enable_gqa` shares them among the query heads, nothing repeats them.

A backend splits its work in two, as vLLM's do: `plan_decodes` turns the decode rows' block
tables into the backend's own plan, once per step and sliding window (planning.py calls it);
`decode` and `prefill` run one layer's attention from that plan. Three backends:

    TorchSDPABackend   gather the blocks, SDPA per group of similar context lengths
    FusedDecodeBackend the same groups, read in place by inductor's kernel (`--compile`)
    CppDecodeBackend   every decode seq in one call of kvserve's C++ kernel (kernels/)

Every backend prefills with SDPA over the gathered blocks (`AttentionBackend.prefill`).
selector.py says which one a runner gets.

Masked-out slots (block padding, stale blocks out of the window) still meet a zero weight in
SDPA, and 0 * NaN is NaN: the caches must hold finite values, so allocate them with zeros.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Generic, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kvserve.kernels import paged_decode_attention
from kvserve.kv.quant import LayerKV, read_blocks
from kvserve.model.fused_attention import dense, fused_decode_attention

if TYPE_CHECKING:
    from kvserve.model.attention.planning import SeqPlan

PlanT = TypeVar("PlanT")


class AttentionBackend(ABC, Generic[PlanT]):
    """One way to attend: plans the decode rows once per step, then runs every layer."""

    name: ClassVar[str]  # for logs and tests
    compiled_variants: ClassVar[int] = 0  # graphs `warmup` compiles (torch.compile's limit)

    @abstractmethod
    def plan_decodes(
        self,
        block_tables: Tensor,
        seq_lens: list[int],
        block_size: int,
        window: int | None,
        device: torch.device,
    ) -> PlanT:
        """The decode rows' plan, shared by every layer with this sliding window.

        Args:
            block_tables: (num_decodes, width) int64, each decode seq's blocks, padded with 0.
            seq_lens: each decode seq's context length, its new token included.
            block_size: tokens per block.
            window: sliding window in tokens, or None.
            device: where the plan's tensors go.
        """

    @abstractmethod
    def decode(self, q: Tensor, kv_cache: LayerKV, plan: PlanT, scale: float) -> Tensor:
        """(num_decodes, num_heads, head_dim) queries -> the same shape, one layer; their
        K/V are already in `kv_cache`."""

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, kv_cache: LayerKV | None, seq: SeqPlan, scale: float
    ) -> Tensor:
        """One seq's rows alone: a prefill chunk, or any seq when there is no cache.

        Args:
            q: (q_len, num_heads, head_dim) the seq's queries.
            k, v: (q_len, num_kv_heads, head_dim) its new tokens' keys and values (already
                written when there is a cache, which then gives every key of the context).
            kv_cache: this layer's cache, or None to attend among the new tokens only.
            seq: from planning.py: its blocks and mask.
            scale: softmax scale.

        Returns:
            (q_len, num_heads, head_dim).
        """
        if kv_cache is not None:
            k = _gather(kv_cache.k, kv_cache.k_scale, seq, q.dtype)  # (seq_len, kvh, hd)
            v = _gather(kv_cache.v, kv_cache.v_scale, seq, q.dtype)  # (seq_len, kvh, hd)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # (1, num_heads, q_len, head_dim)
            k.transpose(0, 1).unsqueeze(0),  # (1, num_kv_heads, seq_len, head_dim)
            v.transpose(0, 1).unsqueeze(0),  # (1, num_kv_heads, seq_len, head_dim)
            attn_mask=seq.mask,
            is_causal=seq.mask is None,
            scale=scale,
            enable_gqa=True,
        )  # (1, num_heads, q_len, head_dim)
        return out[0].transpose(0, 1)  # (q_len, num_heads, head_dim)

    def warmup(self, num_heads: int, head_dim: int, dtype: torch.dtype, layer: LayerKV) -> None:
        """Compile what this backend compiles, on the null block, before any request."""


def _gather(cache: Tensor, scale: Tensor | None, seq: SeqPlan, dtype: torch.dtype) -> Tensor:
    assert seq.block_ids is not None
    blocks = read_blocks(cache, scale, seq.block_ids, dtype)  # (num_blocks, bs, kvh, hd)
    return blocks.flatten(0, 1)[: seq.seq_len]  # (seq_len, kv_heads, head_dim)


class DecodeGroup(NamedTuple):
    """Decode seqs of similar context length, attended in one batched call."""

    rows: Tensor | None  # (g,) their rows among the decodes; None = all rows, in order
    block_ids: Tensor  # (g, max_blocks): padded to the group's longest context
    mask: Tensor  # (g, 1, 1, max_blocks * block_size) bool, True = attend


DECODE_GROUP_RATIO = 0.9
DECODE_GROUP_MIN_GAP = 4  # blocks; below this, padding costs less than another call


class TorchSDPABackend(AttentionBackend[list[DecodeGroup]]):
    """Decode seqs gathered and attended by SDPA, grouped by context length.

    Gathering K/V and attending are memory-bound: a batch padded to its longest context
    moves every padded slot too. Sorted by length, a new group starts when a context is
    below DECODE_GROUP_RATIO of its group's longest by at least DECODE_GROUP_MIN_GAP blocks.
    """

    name = "torch"

    def plan_decodes(
        self,
        block_tables: Tensor,
        seq_lens: list[int],
        block_size: int,
        window: int | None,
        device: torch.device,
    ) -> list[DecodeGroup]:
        n = len(seq_lens)
        num_blocks = [-(-seq_len // block_size) for seq_len in seq_lens]
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
            return [_decode_group(block_tables, seq_lens, block_size, None, window, device)]
        plan = []
        for rows in groups:
            row_ids = torch.tensor(rows, device=device)  # (g,)
            lens = [seq_lens[row] for row in rows]
            table = block_tables[row_ids]  # (g, width)
            plan.append(_decode_group(table, lens, block_size, row_ids, window, device))
        return plan

    def decode(self, q: Tensor, kv_cache: LayerKV, plan: list[DecodeGroup], scale: float) -> Tensor:
        """One call per group; rows come back in batch order."""
        if len(plan) == 1 and plan[0].rows is None:
            return self._attend_group(q, kv_cache, plan[0], scale)
        out = torch.empty_like(q)  # (num_decodes, num_heads, head_dim)
        for group in plan:
            assert group.rows is not None
            q_group = q.index_select(0, group.rows)  # (g, num_heads, head_dim)
            out.index_copy_(0, group.rows, self._attend_group(q_group, kv_cache, group, scale))
        return out

    def _attend_group(
        self, q: Tensor, kv_cache: LayerKV, group: DecodeGroup, scale: float
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


def _decode_group(
    block_tables: Tensor,
    seq_lens: list[int],
    block_size: int,
    row_ids: Tensor | None,
    window: int | None,
    device: torch.device,
) -> DecodeGroup:
    """block_tables: (g, width) the group's rows, in the order of `seq_lens`."""
    max_blocks = -(-max(seq_lens) // block_size)
    lens = torch.tensor(seq_lens, device=device).unsqueeze(1)  # (g, 1)
    key_pos = torch.arange(max_blocks * block_size, device=device)  # (max_keys,)
    mask = key_pos < lens  # (g, max_keys)
    if window is not None:
        mask &= key_pos >= lens - window  # (g, max_keys)
    block_ids = block_tables[:, :max_blocks]  # (g, max_blocks)
    return DecodeGroup(row_ids, block_ids, mask.view(len(seq_lens), 1, 1, -1))


class FusedDecodeBackend(TorchSDPABackend):
    """The SDPA backend's groups, each read in place by inductor's fused kernel
    (fused_attention.py). Chosen with `--compile` for caches that `fused_reads`."""

    name = "fused"
    compiled_variants = 4  # the shape classes `warmup` compiles

    def _attend_group(
        self, q: Tensor, kv_cache: LayerKV, group: DecodeGroup, scale: float
    ) -> Tensor:
        mask = group.mask.view(q.shape[0], -1)  # (n, max_keys): one rank for every call
        block_ids = dense(group.block_ids)  # (n, max_blocks); a slice of the block table
        return fused_decode_attention(dense(q), kv_cache, block_ids, mask, scale)

    def warmup(self, num_heads: int, head_dim: int, dtype: torch.dtype, layer: LayerKV) -> None:
        """Compile the kernel for each shape class it specializes on.

        Dynamic shapes still specialize sizes 0 and 1: a group of one seq, or of seqs in one
        block, is its own compiled variant. Built here on the null block, not at a request.
        """
        device = layer.k.device
        for rows, blocks in ((1, 1), (1, 2), (2, 1), (2, 2)):
            q = torch.zeros(rows, num_heads, head_dim, dtype=dtype, device=device)  # (r, h, hd)
            block_ids = torch.zeros((rows, blocks), dtype=torch.long, device=device)  # (r, b)
            mask = torch.ones(
                (rows, blocks * layer.k.shape[1]), dtype=torch.bool, device=device
            )  # (rows, blocks * block_size)
            scale = head_dim**-0.5  # the models' scale: a float is a guarded constant
            fused_decode_attention(q, layer, block_ids, mask, scale)


class DecodeKernelPlan(NamedTuple):
    """Every decode seq in one call of the C++ kernel, which walks each seq's own blocks."""

    block_table: Tensor  # (num_decodes, width) int64, contiguous
    seq_lens: list[int]
    window: int | None


class CppDecodeBackend(AttentionBackend[DecodeKernelPlan]):
    """Decode rows in kvserve's C++ kernel (kernels/): no groups, no padding, no copy.
    Chosen by `--attention-backend auto` where `decode_kernel_applies`."""

    name = "cpp"

    def plan_decodes(
        self,
        block_tables: Tensor,
        seq_lens: list[int],
        block_size: int,
        window: int | None,
        device: torch.device,
    ) -> DecodeKernelPlan:
        return DecodeKernelPlan(dense(block_tables), seq_lens, window)

    def decode(self, q: Tensor, kv_cache: LayerKV, plan: DecodeKernelPlan, scale: float) -> Tensor:
        return paged_decode_attention(
            dense(q), kv_cache, *plan, scale
        )  # (num_decodes, num_heads, head_dim)
