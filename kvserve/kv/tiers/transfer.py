"""KV blocks handed from one engine to another through their tiers: the transfer of
prefill/decode disaggregation (`kvserve cluster --prefill-replicas M --decode-replicas K`).

    prefill engine                                   decode engine
    computes the prompt; every full block is         import_entries: the entries go into its
    written through to its tiers (tiered.py)  ---->  fastest tier; its next lookup of the
    export_entries(prompt's hashes): the stored      prompt finds them there and loads them
    entries, as stored (serde.py: header, key,       (or recomputes: `kv_restore`); a corrupt
    checksum), in chain order                        or foreign entry is a miss, never a token

An entry travels as the bytes a tier stores, so the receiver checks it exactly as it checks
its own tiers: the model fingerprint, KV dtype and block size in the header must be its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvserve.kv.kv_connector import KVConnector
from kvserve.kv.tiers.tiered import TieredConnector

Entry = tuple[bytes, bytes]  # (block hash, the stored entry)


def export_entries(connector: KVConnector | None, block_hashes: Sequence[bytes]) -> list[Entry]:
    """The stored entries of the leading blocks of a hash chain, from the fastest tier that
    holds each; stops at the first block no tier holds ([] without tiers)."""
    if not isinstance(connector, TieredConnector):
        return []
    entries = []
    for block_hash in block_hashes:
        value = next(
            (v for v in (store.get(block_hash) for store in connector.stores) if v is not None),
            None,
        )
        if value is None:
            break
        entries.append((block_hash, value))
    return entries


def import_entries(connector: KVConnector | None, entries: Sequence[Entry]) -> int:
    """Put entries into the fastest tier (whole chains, in order); how many it took (0
    without tiers, fewer when the tier is full)."""
    if not isinstance(connector, TieredConnector):
        return 0
    store = connector.stores[0]
    taken = 0
    for block_hash, value in entries:
        if not store.put(block_hash, value):
            break
        taken += 1
    return taken
