"""KV stores below the block pool (DESIGN.md section 4): a store contract (base.py), one
block's bytes (serde.py), host RAM (cpu.py) and local disk (disk.py)."""

from kvserve.kv.tiers.base import KVStore, TierStats
from kvserve.kv.tiers.cpu import CPUStore
from kvserve.kv.tiers.disk import DiskStore
from kvserve.kv.tiers.serde import BlockData, BlockLayout, decode_block, encode_block

__all__ = [
    "BlockData",
    "BlockLayout",
    "CPUStore",
    "DiskStore",
    "KVStore",
    "TierStats",
    "decode_block",
    "encode_block",
]
