"""The multi-tier what-if: lower tiers (CPU RAM, disk, a remote pool) below the block pool.

Blocks the device pool evicts are demoted into the first lower tier; each tier is LRU and
demotes its own victims one tier down; the last tier drops them. A block lives in at most one
lower tier. Restoring a block costs its K/V bytes over the tier's bandwidth, which the replay
weighs against recomputing it at the measured prefill throughput:

    device pool --evict--> cpu (LRU, C1 blocks) --evict--> disk (LRU, C2 blocks) --> dropped
          ^------------------- restore (bytes / bandwidth) ----------'

This is a model for sizing, not the engine's tier code (kv/tiers/): only counts and times.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from kvserve.sim.results import CostModel


class TierSpec(NamedTuple):
    name: str
    capacity_blocks: int
    bandwidth_gb_s: float  # restore bandwidth, 1e9 bytes per second


def parse_tiers(text: str) -> list[TierSpec]:
    """ "cpu:20000:25,disk:200000:3" -> tiers (name:capacity in blocks:bandwidth in GB/s).

    Raises:
        ValueError: a malformed entry, a repeated name, or a capacity or bandwidth <= 0; the
            message names --tiers and the entry.
    """
    tiers: list[TierSpec] = []
    for entry in text.split(","):
        parts = entry.strip().split(":")
        try:
            if len(parts) != 3 or not parts[0]:
                raise ValueError
            spec = TierSpec(parts[0], int(parts[1]), float(parts[2]))
        except ValueError:
            message = "each entry is name:capacity_blocks:bandwidth_gb_s"
            raise ValueError(f"--tiers: {message}, got {entry!r}") from None
        if spec.capacity_blocks < 1 or not spec.bandwidth_gb_s > 0:
            raise ValueError(f"--tiers: capacity and bandwidth must be > 0, got {entry!r}")
        if any(t.name == spec.name for t in tiers):
            raise ValueError(f"--tiers: tier {spec.name!r} given twice")
        tiers.append(spec)
    return tiers


class LowerTiers:
    """The lower tiers' contents (block hashes only) and their restore costs."""

    def __init__(self, tiers: list[TierSpec], cost: CostModel) -> None:
        self.tiers = tiers
        self.cost = cost
        self._contents: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in tiers]

    def put(self, block_hash: bytes) -> None:
        """A block evicted from the device pool: into the first tier, cascading victims down."""
        for contents in self._contents:
            contents.pop(block_hash, None)
        item: bytes | None = block_hash
        for spec, contents in zip(self.tiers, self._contents, strict=True):
            if item is None:
                return
            contents[item] = None
            item = contents.popitem(last=False)[0] if len(contents) > spec.capacity_blocks else None

    def find(self, block_hash: bytes) -> TierSpec | None:
        """The tier holding the block (refreshed as most recently used there), or None."""
        for spec, contents in zip(self.tiers, self._contents, strict=True):
            if block_hash in contents:
                contents.move_to_end(block_hash)
                return spec
        return None

    def load_s(self, tier: TierSpec, num_tokens: int) -> float:
        """Seconds to restore `num_tokens` tokens' K/V from `tier`."""
        return num_tokens * self.cost.kv_bytes_per_token / (tier.bandwidth_gb_s * 1e9)

    def contents(self, name: str) -> list[bytes]:
        """The hashes a tier holds, least recently used first (for tests)."""
        index = [t.name for t in self.tiers].index(name)
        return list(self._contents[index])
