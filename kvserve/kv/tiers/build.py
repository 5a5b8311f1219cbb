"""The tier chain an engine's arguments ask for: `kv_cpu_bytes`, `kv_disk_dir`, `kv_remote_url`
(in that order: fastest first)."""

from __future__ import annotations

from pathlib import Path

from kvserve.config import EngineConfig
from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.tiers.base import KVStore
from kvserve.kv.tiers.cpu import CPUStore
from kvserve.kv.tiers.disk import DiskStore
from kvserve.kv.tiers.redis_store import RedisStore
from kvserve.kv.tiers.tiered import TieredConnector


def build_tier_connector(
    params: BlockHashParams, config: EngineConfig, sliding_window: int | None
) -> TieredConnector | None:
    """The chain the tier arguments ask for (CPU, then disk, then Redis), or None for none.

    `kv_remote_secret` signs the entries of every tier (HMAC), not only Redis's: one entry's
    bytes are written to all of them. An engine with another secret (or none) reads the disk
    and Redis entries of this one as misses.

    Raises:
        ValueError: tiers asked for where they cannot serve: cache_mode other than "paged",
            prefix caching off, or a sliding-window model (no whole prefix is kept); the
            message names the first tier argument given. A bad `kv_disk_dir` or an unparsable
            `kv_remote_url` (an unreachable Redis is no error: the store starts down).
    """
    given = {
        "kv_cpu_bytes": config.kv_cpu_bytes > 0,
        "kv_disk_dir": config.kv_disk_dir is not None,
        "kv_remote_url": config.kv_remote_url is not None,
    }
    names = [name for name, on in given.items() if on]
    if not names:
        return None
    if config.cache_mode != "paged" or not config.enable_prefix_caching:
        raise ValueError(f"{names[0]}: KV tiers need cache_mode 'paged' with prefix caching on")
    if sliding_window is not None:
        raise ValueError(f"{names[0]}: a sliding-window model keeps no whole prefix to restore")
    stores: list[KVStore] = []
    if config.kv_cpu_bytes > 0:
        stores.append(CPUStore(config.kv_cpu_bytes))
    if config.kv_disk_dir is not None:
        stores.append(DiskStore(Path(config.kv_disk_dir), config.kv_disk_bytes))
    if config.kv_remote_url is not None:
        stores.append(RedisStore(config.kv_remote_url, params))
    secret = None if config.kv_remote_secret is None else config.kv_remote_secret.encode()
    return TieredConnector(stores, params, secret=secret, restore=config.kv_restore)
