"""KV stores below the block pool (DESIGN.md section 4): a store contract (base.py), one
block's bytes (serde.py), host RAM (cpu.py), local disk (disk.py), a shared Redis
(redis_store.py), the chain that connects them to the pool as a KV connector (tiered.py), its
background writer for the slow tiers (writer.py), its per-tier metrics (metrics.py) and its
restore-or-recompute decision (restore_policy.py, cost.py)."""

from kvserve.kv.tiers.base import KVStore, TierStats
from kvserve.kv.tiers.build import build_tier_connector
from kvserve.kv.tiers.cpu import CPUStore
from kvserve.kv.tiers.disk import DiskStore
from kvserve.kv.tiers.redis_store import RedisStore
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
    "RedisStore",
    "TierStats",
    "TieredConnector",
    "build_tier_connector",
    "decode_block",
    "encode_block",
]
