"""Planning: the step's batch layout (`AttentionMetadata`) turned into masks and block indices.

The flat batch holds the decode seqs first (one token each), then prefill chunks:

    rows:  [ d0 d1 .. d(nd-1) | p0 p0 p0 | p1 p1 .. p1 ]
             num_decodes        query_start_loc[i] .. query_start_loc[i+1]

A chunk of q_len tokens of a seq whose context after the step is seq_len holds positions
[seq_len - q_len, seq_len); query row r (position p = seq_len - q_len + r) sees the keys
j with p - sliding_window < j <= p (the causal mask aligned to the bottom right).

`plan_attention` runs once per step and sliding window, and every layer with that window
shares its plan. The prefill rows are planned here, the same for every backend; the decode
rows are planned by the step's backend (backends.py), since each reads the cache its own way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kvserve.model.attention.backends import AttentionBackend, TorchSDPABackend


@dataclass
class AttentionMetadata:
    """Per-step batch layout, built by the model runner once per step from Python lists."""

    query_start_loc: list[int]  # num_seqs + 1 cumulative query lengths
    seq_lens: list[int]  # per seq: context length after this step
    num_decodes: int  # seqs [0, num_decodes) have query length 1 and come first
    slot_mapping: Tensor | None  # (num_tokens,) int64 cache slot of each new token
    block_tables: Tensor | None  # (num_seqs, max_blocks_per_seq) int64, padded with 0
    block_size: int
    # How decode rows attend; the runner chooses it once (selector.py)
    backend: AttentionBackend[Any] = field(default_factory=TorchSDPABackend)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


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
    backend: AttentionBackend[Any]
    num_decodes: int  # rows [0, num_decodes) attend through `backend.decode`
    decode: Any  # the backend's own plan of those rows (None when there are none)
    seqs: list[SeqPlan]


def plan_attention(
    md: AttentionMetadata, sliding_window: int | None, cached: bool, device: torch.device
) -> AttentionPlan:
    """Turn the step's metadata into masks and block indices, once for all layers.

    Without a cache (`cached` False) every seq attends causally among its new tokens only.
    """
    if not cached:
        seqs = [_plan_seq(md, i, sliding_window, False, device) for i in range(md.num_seqs)]
        return AttentionPlan(None, md.backend, 0, None, seqs)
    num_decodes = md.num_decodes
    decode = None
    if num_decodes:
        assert md.block_tables is not None, "a cached step needs block_tables"
        decode = md.backend.plan_decodes(
            md.block_tables[:num_decodes],
            md.seq_lens[:num_decodes],
            md.block_size,
            sliding_window,
            device,
        )
    seqs = [_plan_seq(md, i, sliding_window, True, device) for i in range(num_decodes, md.num_seqs)]
    return AttentionPlan(md.slot_mapping, md.backend, num_decodes, decode, seqs)


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
