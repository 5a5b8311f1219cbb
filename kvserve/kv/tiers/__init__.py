"""KV stores below the block pool (DESIGN.md section 4): a store contract (base.py), one
block's bytes (serde.py), host RAM (cpu.py), local disk (disk.py), the chain that connects
them to the pool as a KV connector (tiered.py), its background writer for the slow tiers
(writer.py) and its per-tier metrics (metrics.py)."""

from kvserve.kv.tiers.base import KVStore, TierStats
from kvserve.kv.tiers.build import build_tier_connector
from kvserve.kv.tiers.cpu import CPUStore
from kvserve.kv.tiers.disk import DiskStore
from kvserve.kv.tiers.serde import BlockData, BlockLayout, decode_block, encode_block
from kvserve.kv.tiers.tiered import TieredConnector
from kvserve.kv.tiers.writer import BackgroundWriter

__all__ = [
    "BackgroundWriter",
    "BlockData",
    "BlockLayout",
    "CPUStore",
    "DiskStore",
    "KVStore",
    "TierStats",
    "TieredConnector",
    "build_tier_connector",
    "decode_block",
    "encode_block",
]
