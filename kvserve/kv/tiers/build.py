"""The tier chain an engine's arguments ask for: `kv_cpu_bytes`, `kv_disk_dir` (CPU first)."""

from __future__ import annotations

from pathlib import Path

from kvserve.config import EngineConfig
from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.tiers.base import KVStore
from kvserve.kv.tiers.cpu import CPUStore
from kvserve.kv.tiers.disk import DiskStore
from kvserve.kv.tiers.tiered import TieredConnector


def build_tier_connector(
    params: BlockHashParams, config: EngineConfig, sliding_window: int | None
) -> TieredConnector | None:
    """The chain `kv_cpu_bytes` and `kv_disk_dir` ask for (CPU first), or None for none.

    Raises:
        ValueError: tiers asked for where they cannot serve: cache_mode other than "paged",
            prefix caching off, or a sliding-window model (no whole prefix is kept); the
            message names the tier's argument.
    """
    stores: list[KVStore] = []
    if config.kv_cpu_bytes > 0:
        stores.append(CPUStore(config.kv_cpu_bytes))
    if config.kv_disk_dir is not None:
        stores.append(DiskStore(Path(config.kv_disk_dir), config.kv_disk_bytes))
    if not stores:
        return None
    name = "kv_cpu_bytes" if config.kv_cpu_bytes > 0 else "kv_disk_dir"
    if config.cache_mode != "paged" or not config.enable_prefix_caching:
        raise ValueError(f"{name}: KV tiers need cache_mode 'paged' with prefix caching on")
    if sliding_window is not None:
        raise ValueError(f"{name}: a sliding-window model keeps no whole prefix to restore")
    return TieredConnector(stores, params, restore=config.kv_restore)
