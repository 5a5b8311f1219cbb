"""Restore or recompute (`kv_restore`): how many leading blocks of a run found in the tiers
to load; the rest are computed by the forward. A pure function of a cost table (cost.py
measures one).

A run is the blocks after the pool hit that the tiers hold, split by tier in run order (it may
go cpu, disk, cpu). Loading its first k blocks and computing the other n - k is always valid:
a loaded block needs only the blocks before it.

    run       [ cpu cpu | disk disk disk | cpu ]      n = 6 blocks
    choice k  [ loaded ...... k | computed ...... ]   0 <= k <= n

    total(k) = sum of load_s(block i) for i < k   +   (n - k) * block_size * prefill_s_per_token

"auto" returns the k with the smallest predicted total, the smallest such k on a tie (a load
must be strictly cheaper than the compute it replaces). Within a segment of one tier every
block changes the total by the same amount, so only segment ends are candidates. "never"
returns 0, "always" n.

The prefill model is linear in tokens (seconds per token, measured over prefill forwards),
and the position of the run does not enter it:
- the tokens after the run are computed either way and attend to the whole prefix either way
  (loaded or computed), so their cost cancels out of the comparison;
- the last prompt token is always computed, so a step's fixed cost (reading the weights) is
  paid either way; a recompute that needs more chunked steps pays it more often, which the
  measured rate includes on average (seconds over tokens of whole forwards);
- attention's share grows with the position, which a linear model averages into the measured
  rate. At the lengths a CPU serves, the matmuls dominate a prefill token's cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from kvserve.config import KV_RESTORE_MODES


class TierCost(NamedTuple):
    """The predicted cost of loading blocks from one tier: a fixed latency per block plus its
    bytes over a bandwidth (read and decode: checksum, copy into tensors)."""

    latency_s: float  # seconds per block
    bandwidth: float  # bytes per second; inf: the bytes cost nothing beyond the latency

    def load_s(self, num_blocks: int, block_bytes: int) -> float:
        return num_blocks * (self.latency_s + block_bytes / self.bandwidth)


class CostTable(NamedTuple):
    """What `num_blocks_to_load` weighs: each tier's load cost and the cost of prefill.

    A tier missing from `tiers` has not been measured yet and loads for free; a
    `prefill_s_per_token` of None (no prefill measured yet) makes "auto" load the whole run,
    as "always" does.
    """

    tiers: Mapping[str, TierCost]
    block_bytes: int  # one serialized block
    block_size: int  # tokens per block
    prefill_s_per_token: float | None


class RunSegment(NamedTuple):
    """Consecutive blocks of a run that one tier supplies."""

    tier: str
    num_blocks: int


FREE = TierCost(0.0, float("inf"))


def num_blocks_to_load(run: Sequence[RunSegment], costs: CostTable, mode: str) -> int:
    """How many leading blocks of `run` to load; the rest are recomputed.

    Args:
        run: the run found in the tiers, split by tier, in run order.
        costs: each tier's load cost and the prefill cost (see the module docstring).
        mode: `kv_restore`: "never" (0), "always" (the whole run) or "auto" (the cheapest
            predicted total; ties recompute).

    Returns:
        k in [0, number of blocks in run].

    Raises:
        ValueError: an unknown mode (the message names kv_restore).
    """
    if mode not in KV_RESTORE_MODES:
        raise ValueError(f"kv_restore: must be one of {KV_RESTORE_MODES}, got {mode!r}")
    num_blocks = sum(segment.num_blocks for segment in run)
    if mode == "never":
        return 0
    if mode == "always" or costs.prefill_s_per_token is None:
        return num_blocks
    compute_s = costs.block_size * costs.prefill_s_per_token  # one block
    best_k, best_s, total_s, k = 0, 0.0, 0.0, 0  # total_s: total(k) - total(0)
    for tier, num in run:
        block_s = costs.tiers.get(tier, FREE).load_s(1, costs.block_bytes)
        total_s += num * (block_s - compute_s)
        k += num
        if total_s < best_s:
            best_k, best_s = k, total_s
    return best_k
