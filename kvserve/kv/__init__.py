"""KV memory: block bookkeeping (pure Python, no torch), hashing, sizing, tiers and tensors.

The scheduler talks only to `KVCacheManager`; the tensors live in `kv_cache.py` and are used
only by the model runner.
"""

from kvserve.kv.block import FreeBlockQueue, KVBlock
from kvserve.kv.block_hash import BlockHashParams, block_hashes, extend_block_hashes, hash_block
from kvserve.kv.block_pool import NULL_BLOCK_ID, BlockPool
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.prefix_cache import PrefixCacheStats

__all__ = [
    "NULL_BLOCK_ID",
    "BlockHashParams",
    "BlockPool",
    "FreeBlockQueue",
    "KVBlock",
    "KVCacheManager",
    "PrefixCacheStats",
    "block_hashes",
    "extend_block_hashes",
    "hash_block",
]
