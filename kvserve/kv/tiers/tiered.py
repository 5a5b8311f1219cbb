"""The tier chain: a `KVConnector` over the stores below the block pool (CPU RAM, disk, ...).

Lookup continues a request's hash chain past the pool, down the tiers in order: each tier
extends the run where the one above stopped (one batched `num_leading` query per tier);
`kv_restore` decides how much of the run to load from the counts alone (restore_policy.py,
with the measured costs of cost.py), and those blocks are read and checked at once (kept
until the step's loads are decided, `prepare_loads`), so the step's loads can no longer fail:

    hashes     [ h0 h1 h2 | h3 h4 h5 h6 | h7 ... ]
    pool hit     h0 h1 h2
    cpu                     h3 h4
    disk                          h5 h6            -> a run of 4; h7 is computed
    decide      load h3..h6, a prefix of them, or none (then nothing is read)
    read + decode the blocks to load now (staged); an unreadable entry ends the run there

`load_blocks` writes the staged blocks into the pool before the forward; `save_blocks` writes
every newly computed full block through to every tier after the forward: into the CPU tier in
the step (a memory copy), into the slow tiers (disk, Redis) through a bounded background
writer (writer.py) that drops a write when its queue is full. A corrupt, truncated, foreign
or missing entry is a miss, never an exception in a request and never a wrong token:
`decode_block` checks the header, the key and the checksum.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from kvserve.config import KV_RESTORE_MODES
from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_cache import BlockData, KVCaches, read_block, write_block
from kvserve.kv.kv_connector import ConnectorMetrics, KVConnector
from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.kv.tiers.base import KVStore
from kvserve.kv.tiers.cost import RestoreCostModel, probe_store
from kvserve.kv.tiers.metrics import LatencyHistogram, tier_metrics
from kvserve.kv.tiers.restore_policy import RunSegment, num_blocks_to_load
from kvserve.kv.tiers.serde import BlockLayout, decode_block, encode_block
from kvserve.kv.tiers.staging import StagedBlocks
from kvserve.kv.tiers.writer import DEFAULT_MAX_QUEUED_BYTES, BackgroundWriter


@dataclass
class RestoreStats:
    """Restore-or-recompute decisions (`kv_restore`), one per lookup that found a run in the
    tiers; a waiting request looked up again in a later step is decided (and counted) again.

    `blocks_loaded` counts blocks read and checked for loading; `blocks_recomputed` those the
    decision left to the forward although a tier held them (unreadable entries are counted
    in `TieredConnector.num_unreadable` instead).
    """

    runs_loaded: int = 0  # lookups that load at least one block
    runs_recomputed: int = 0  # lookups that decided to load none
    blocks_loaded: int = 0
    blocks_recomputed: int = 0


class TieredConnector(KVConnector):
    """Loads and saves pool blocks through a chain of stores, fastest first.

    Args:
        stores: the tiers, in lookup order (CPU before disk before remote).
        params: the engine's hash parameters; every entry's header carries them, so an entry
            written by an engine with another model, kv dtype or block size is a miss.
        secret: signs entries (HMAC) instead of a plain checksum.
        restore: `kv_restore`: "auto" (load what is predicted cheaper than computing it, by
            the measured `costs`), "always" or "never".
        max_queued_bytes: the background writer's bound (writer.py); it runs only when some
            store does I/O on put (`inline_writes` False).

    Raises:
        ValueError: no stores, an unknown restore mode (the message names the argument), or
            `max_queued_bytes` negative.
    """

    def __init__(
        self,
        stores: Sequence[KVStore],
        params: BlockHashParams,
        secret: bytes | None = None,
        restore: str = "auto",
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    ) -> None:
        if not stores:
            raise ValueError("stores: a tier chain needs at least one store")
        if restore not in KV_RESTORE_MODES:
            raise ValueError(f"kv_restore: must be one of {KV_RESTORE_MODES}, got {restore!r}")
        self.stores = list(stores)
        self.params = params
        self.secret = secret
        self.restore = restore
        self.costs = RestoreCostModel(params.block_size)  # probed at register_kv_caches
        self.restore_stats = RestoreStats()
        self.num_unreadable = 0  # entries found but corrupt, truncated or foreign (misses)
        self._load_seconds = {store.name: LatencyHistogram() for store in self.stores}
        slow = any(not store.inline_writes for store in self.stores)
        self._writer = BackgroundWriter(max_queued_bytes) if slow else None
        self._layout: BlockLayout | None = None  # the pool's block layout (register_kv_caches)
        self._probe_block: BlockData | None = None  # what cost probes store (the null block)
        # Blocks read and checked at lookup (with their tier), until a step loads them.
        self._staged = StagedBlocks()
        self._to_load: dict[bytes, BlockData] = {}

    @property
    def saves_blocks(self) -> bool:
        return True

    def register_kv_caches(self, kv_caches: KVCaches) -> None:
        """Learn the block layout (block 0, the null block, has it); with "auto", probe each
        tier's load cost with one block (cost.py)."""
        block = read_block(kv_caches, 0)
        self._layout = BlockLayout.of(block)
        if self.restore != "auto":
            return
        self._probe_block = block
        self.costs.block_bytes = len(encode_block(block, bytes(32), self.params, self.secret))
        for store in self.stores:
            self._probe(store)

    def _probe(self, store: KVStore, at_start: bool = True) -> None:
        """Measure one tier's load cost with the null block under a fresh key (cost.py)."""
        assert self._layout is not None and self._probe_block is not None
        key = os.urandom(32)  # a fresh key: no engine's block, no other engine's probe
        payload = encode_block(self._probe_block, key, self.params, self.secret)
        layout = self._layout

        def decode(value: bytes) -> BlockData | None:
            return decode_block(value, key, self.params, layout, self.secret)

        probe = probe_store(store, key, payload, decode, keep_stats=at_start)
        if probe is not None:
            self.costs.set_tier(store.name, probe.latency_s, probe.block_s)

    def record_forward(self, num_tokens: int, num_decodes: int, seconds: float) -> None:
        self.costs.observe_forward(num_tokens, num_decodes, seconds)

    def num_external_hit_blocks(self, block_hashes: Sequence[bytes]) -> int:
        """The leading blocks of `block_hashes` to load: of the run the tiers hold, those
        `kv_restore` chooses (decided from the counts, before any read), read and checked now
        (staged); an unreadable one ends the run there."""
        if self._layout is None:  # no pool yet: nothing to load into
            return 0
        candidates = self._candidates(block_hashes)
        if not candidates:
            return 0
        run = _run_segments([store.name for _, store in candidates])
        num_load = num_blocks_to_load(run, self.costs.table(), self.restore)
        if num_load < len(candidates) and self.costs.is_stale(candidates[num_load][1].name):
            self._probe(candidates[num_load][1], at_start=False)  # not read since: measure
            num_load = num_blocks_to_load(run, self.costs.table(), self.restore)
        num_read = self._stage(candidates[:num_load], self._layout)
        stats = self.restore_stats
        stats.runs_loaded += int(num_read > 0)
        stats.runs_recomputed += int(num_load == 0)
        stats.blocks_loaded += num_read
        stats.blocks_recomputed += len(candidates) - num_load
        return num_read

    def get_hit_tiers(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """How many of these blocks (counted by the last lookup) each tier supplies."""
        return dict(Counter(self._staged.tier_of(block_hash) for block_hash in block_hashes))

    def num_held_blocks(self, block_hashes: Sequence[bytes]) -> int:
        """The run of `block_hashes` some tier holds (existence queries only, nothing read)."""
        return len(self._candidates(block_hashes))

    def prepare_loads(self, blocks: Sequence[BlockTransfer]) -> None:
        """Take the staged blocks this step loads; the rest stay staged (bounded) for the
        requests still waiting, so their blocks are not read again."""
        self._to_load = self._staged.take([block.block_hash for block in blocks])

    def load_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        """Write each block read at lookup into its pool block."""
        to_load, self._to_load = self._to_load, {}
        for block_id, block_hash in blocks:
            write_block(kv_caches, block_id, to_load[block_hash])

    def save_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        """Encode each block once, now (its pool block may be reused after this step), and
        put it into every tier: inline where a put is a memory copy, else through the
        background writer, which drops it when full (a full tier evicts LRU)."""
        for block_id, block_hash in blocks:
            data = read_block(kv_caches, block_id)
            payload = encode_block(data, block_hash, self.params, self.secret)
            for store in self.stores:
                if self._writer is None or store.inline_writes:
                    store.put(block_hash, payload)
                else:
                    self._writer.submit(store, block_hash, payload)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the background writer has written every block saved so far."""
        return self._writer is None or self._writer.flush(timeout)

    def close(self) -> None:
        """Write what the background writer holds, stop its thread, then close the stores."""
        if self._writer is not None:
            self._writer.close()
        for store in self.stores:
            store.close()

    def get_metrics(self) -> ConnectorMetrics:
        """Each tier's counters and load latency, and the unreadable entries found."""
        tiers = {
            store.name: tier_metrics(store.stats, self._load_seconds[store.name], store.occupancy())
            for store in self.stores
        }
        stats = self.restore_stats
        return ConnectorMetrics(
            tiers,
            self.num_unreadable,
            {"load": stats.runs_loaded, "recompute": stats.runs_recomputed},
            {"load": stats.blocks_loaded, "recompute": stats.blocks_recomputed},
        )

    def check_invariants(self) -> None:
        for store in self.stores:
            store.check_invariants()

    def _candidates(self, block_hashes: Sequence[bytes]) -> list[tuple[bytes, KVStore]]:
        """The leading run of hashes some tier holds, each with the first tier found holding
        it: each tier continues the chain where the others stopped, in passes down the tiers
        until none extends it (one batched query per tier and pass; usually one pass)."""
        found: list[tuple[bytes, KVStore]] = []
        extended = True
        while extended and len(found) < len(block_hashes):
            extended = False
            for store in self.stores:
                rest = block_hashes[len(found) :]
                num = store.num_leading(rest) if rest else 0
                found.extend((block_hash, store) for block_hash in rest[:num])
                extended = extended or num > 0
        return found

    def _stage(self, run: Sequence[tuple[bytes, KVStore]], layout: BlockLayout) -> int:
        """Read and check the blocks of `run` not staged yet; the readable leading count."""
        for index, (block_hash, store) in enumerate(run):
            if block_hash in self._staged:
                self._staged.touch(block_hash)
                continue
            data = self._read(store, block_hash, layout)
            if data is None:
                return index
            self._staged.add(block_hash, data, store.name)
        return len(run)

    def _read(self, store: KVStore, block_hash: bytes, layout: BlockLayout) -> BlockData | None:
        """One block from `store`, checked; its read + decode time updates the tier's cost."""
        start = time.perf_counter()
        payload = store.get(block_hash)
        if payload is None:
            return None
        data = decode_block(payload, block_hash, self.params, layout, self.secret)
        if data is None:  # corrupt or foreign: drop it so the next save replaces it
            self.num_unreadable += 1
            store.remove(block_hash)
            return None
        seconds = time.perf_counter() - start  # read + decode
        self._load_seconds[store.name].observe(seconds)
        self.costs.observe_load(store.name, len(payload), seconds)
        return data


def _run_segments(tiers: Sequence[str]) -> list[RunSegment]:
    """Consecutive blocks of one tier, counted: cpu cpu disk cpu -> (cpu 2)(disk 1)(cpu 1)."""
    run: list[RunSegment] = []
    for tier in tiers:
        if run and run[-1].tier == tier:
            run[-1] = RunSegment(tier, run[-1].num_blocks + 1)
        else:
            run.append(RunSegment(tier, 1))
    return run
