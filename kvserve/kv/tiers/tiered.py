"""The tier chain: a `KVConnector` over the stores below the block pool (CPU RAM, disk, ...).

Lookup continues a request's hash chain past the pool, down the tiers in order: each tier
extends the run where the one above stopped (one batched `num_leading` query per tier), and
the run is read and checked at once (kept until the step's loads are decided,
`prepare_loads`), so the step's loads can no longer fail:

    hashes     [ h0 h1 h2 | h3 h4 h5 h6 | h7 ... ]
    pool hit     h0 h1 h2
    cpu                     h3 h4
    disk                          h5 h6            -> 4 blocks to load; h7 is computed
    read + decode h3..h6 now (staged); an unreadable entry ends the run there (a miss)

`load_blocks` writes the staged blocks into the pool before the forward; `save_blocks` writes
every newly computed full block through to every tier after the forward (synchronously, for
now). A corrupt, truncated, foreign or missing entry is a miss, never an exception in a request
and never a wrong token: `decode_block` checks the header, the key and the checksum.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_cache import BlockData, KVCaches, read_block, write_block
from kvserve.kv.kv_connector import KVConnector
from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.kv.tiers.base import KVStore
from kvserve.kv.tiers.serde import BlockLayout, decode_block, encode_block


class TieredConnector(KVConnector):
    """Loads and saves pool blocks through a chain of stores, fastest first.

    Args:
        stores: the tiers, in lookup order (CPU before disk before remote).
        params: the engine's hash parameters; every entry's header carries them, so an entry
            written by an engine with another model, kv dtype or block size is a miss.
        secret: signs entries (HMAC) instead of a plain checksum.

    Raises:
        ValueError: no stores.
    """

    def __init__(
        self, stores: Sequence[KVStore], params: BlockHashParams, secret: bytes | None = None
    ) -> None:
        if not stores:
            raise ValueError("stores: a tier chain needs at least one store")
        self.stores = list(stores)
        self.params = params
        self.secret = secret
        self.num_unreadable = 0  # entries found but corrupt, truncated or foreign (misses)
        self._layout: BlockLayout | None = None  # the pool's block layout (register_kv_caches)
        # Blocks read and checked at lookup, until the step's loads are decided.
        self._staged: dict[bytes, BlockData] = {}
        self._to_load: dict[bytes, BlockData] = {}

    @property
    def saves_blocks(self) -> bool:
        return True

    def register_kv_caches(self, kv_caches: KVCaches) -> None:
        self._layout = BlockLayout.of(read_block(kv_caches, 0))  # block 0: the null block

    def num_external_hit_blocks(self, block_hashes: Sequence[bytes]) -> int:
        """The run of `block_hashes` the tiers hold and can read back, read now (staged)."""
        if self._layout is None:  # no pool yet: nothing to load into
            return 0
        candidates = self._candidates(block_hashes)
        for index, (block_hash, store) in enumerate(candidates):
            if block_hash in self._staged:
                continue
            data = self._read(store, block_hash, self._layout)
            if data is None:
                return index
            self._staged[block_hash] = data
        return len(candidates)

    def num_held_blocks(self, block_hashes: Sequence[bytes]) -> int:
        """The run of `block_hashes` some tier holds (existence queries only, nothing read)."""
        return len(self._candidates(block_hashes))

    def prepare_loads(self, blocks: Sequence[BlockTransfer]) -> None:
        """Keep the staged blocks this step loads; drop what lookups read beyond them."""
        staged, self._staged = self._staged, {}
        self._to_load = {block.block_hash: staged[block.block_hash] for block in blocks}

    def load_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        """Write each block read at lookup into its pool block."""
        to_load, self._to_load = self._to_load, {}
        for block_id, block_hash in blocks:
            write_block(kv_caches, block_id, to_load[block_hash])

    def save_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        """Encode each block once and put it into every tier (a full tier evicts LRU)."""
        for block_id, block_hash in blocks:
            data = read_block(kv_caches, block_id)
            payload = encode_block(data, block_hash, self.params, self.secret)
            for store in self.stores:
                store.put(block_hash, payload)

    def close(self) -> None:
        for store in self.stores:
            store.close()

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

    def _read(self, store: KVStore, block_hash: bytes, layout: BlockLayout) -> BlockData | None:
        payload = store.get(block_hash)
        if payload is None:
            return None
        data = decode_block(payload, block_hash, self.params, layout, self.secret)
        if data is None:  # corrupt or foreign: drop it so the next save replaces it
            self.num_unreadable += 1
            store.remove(block_hash)
        return data
