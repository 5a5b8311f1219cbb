"""The seam through which KV blocks leave and enter the pool: one connector, two halves.

The scheduler half answers while scheduling (the KV cache manager asks it): how many blocks
after a prefix hit it can load, and whether newly written blocks should be saved. The worker
half runs inside `ModelRunner.execute`, carrying out the step's orders:

    execute(out):  save_blocks(out.blocks_to_swap_out)  a preempted request's blocks (swap)
                   load_blocks(out.blocks_to_load)   fill fresh blocks (before anything reads)
                   copy_blocks(out.block_copies)     copy-on-write
                   forward                           writes this step's K/V
                   save_blocks(out.blocks_to_save)   copy full blocks out (after they are written)

Orders are (block_id, block_hash) pairs (`kv_transfer.BlockTransfer`); nothing calls into the
pool mid-step. Without a tier the engine uses `NoKVConnector`: no hits, no saves, and the
runner skips both calls on empty orders, so it costs nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

from kvserve.kv.kv_cache import KVCaches
from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.outputs import TierMetrics


class ConnectorMetrics(NamedTuple):
    """A connector's counters for `Engine.get_metrics` (cumulative)."""

    tiers: dict[str, TierMetrics]  # by tier name, in lookup order; empty: no tiers
    num_unreadable: int  # entries found but corrupt, truncated or foreign (misses)
    # restore-or-recompute decisions (`kv_restore`), one per lookup that found a run:
    # {"load": runs, "recompute": runs} and the blocks of those runs, the same way
    restore_runs: dict[str, int]
    restore_blocks: dict[str, int]


class KVConnector(ABC):
    """Moves KV blocks between the block pool and one place outside it (a tier, a peer)."""

    # ---- scheduler half (`kv_transfer.ExternalBlocks`) -----------------------------------

    @property
    @abstractmethod
    def saves_blocks(self) -> bool:
        """True when the scheduler should list newly written full blocks to save."""

    @abstractmethod
    def num_external_hit_blocks(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `block_hashes` (a hash chain) this connector can load.

        Must not change what it holds: the scheduler may still decide not to load them. A
        block counted here must load in this step if ordered (a connector that can fail to
        read reads and checks the blocks now, keeping them until `prepare_loads`).
        """

    def get_hit_tiers(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """Where the blocks of a run `num_external_hit_blocks` just counted load from: blocks
        per place (a tier's name: "cpu", "disk", "redis"), for `num_cached_tokens_by_tier`.
        No side effects. A connector with one place outside the pool keeps this default."""
        return {"external": len(block_hashes)} if block_hashes else {}

    def num_held_blocks(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `block_hashes` (a hash chain) this connector holds now.

        For swap preemption: the blocks after that run are saved before they are freed.
        Unlike `num_external_hit_blocks` it reads nothing and changes nothing; a block held
        now may still be evicted (or be unreadable) by the time it is looked up.
        """
        return 0  # a connector that cannot tell holds nothing: every block is saved

    def prepare_loads(self, blocks: Sequence[BlockTransfer]) -> None:
        """The step's loads, once per schedule (possibly empty), before `load_blocks`; what
        the lookups found beyond them can be let go."""
        return None  # a hook: connectors that stage reads at lookup override it

    # ---- both halves ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: KVCaches) -> None:
        """The pool, once allocated (the block layout every entry must match)."""
        return None  # a hook: connectors that check layouts override it

    def record_forward(self, num_tokens: int, num_decodes: int, seconds: float) -> None:
        """The model runner's forward of `num_tokens` rows (`num_decodes` single-token
        decodes) took `seconds`: the measured prefill cost a restore decision weighs."""
        return None  # a hook: connectors that weigh loads against prefill override it

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every save ordered so far is written (tests and benchmarks; a step
        never waits). Returns False when `timeout` seconds passed first."""
        return True  # a hook: connectors that write in the background override it

    def close(self) -> None:
        """Finish the saves ordered so far, then release what the connector holds open
        (threads, files, connections)."""
        return None  # a hook: connectors with files or connections override it

    def get_metrics(self) -> ConnectorMetrics:
        """Counters since the connector was made (no side effects)."""
        return ConnectorMetrics({}, 0, {}, {})  # a hook: connectors that count override it

    # ---- worker half (the model runner) ----------------------------------------------------

    @abstractmethod
    def load_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        """Fill each block_id with the K/V stored under its hash, in every layer.

        Called before the forward (and before copy-on-write copies) of the step that ordered
        the loads; every hash was counted by `num_external_hit_blocks` while scheduling it.
        """

    @abstractmethod
    def save_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        """Keep the K/V of each block_id under its hash.

        Called after the forward wrote them (`blocks_to_save`), and before the forward for a
        preempted request's blocks (`blocks_to_swap_out`): the forward may overwrite those,
        so every block must be read out of the pool before this returns (writing the bytes
        on to a slow tier may finish later).
        """


class NoKVConnector(KVConnector):
    """No tier: nothing outside the pool, nothing to save."""

    @property
    def saves_blocks(self) -> bool:
        return False

    def num_external_hit_blocks(self, block_hashes: Sequence[bytes]) -> int:
        return 0

    def load_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        if blocks:
            raise ValueError(f"blocks_to_load: {len(blocks)} blocks, but no tier is configured")

    def save_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        if blocks:
            raise ValueError(f"blocks_to_save: {len(blocks)} blocks, but no tier is configured")
