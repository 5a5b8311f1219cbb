"""The contract of a KV store below the block pool: bytes in, bytes out, keyed by block hash.

A store keeps serialized blocks (serde.py) under their chained block hash (kv/block_hash.py),
so a lookup walks a request's hash chain and stops at the first key it lacks:

    keys:    h0  h1  h2  h3  h4
    held:    h0  h1  --  h3  --
    num_leading(keys) == 2          (h3 is useless without h2: its prefix is not there)

Stores never raise for I/O: a value that cannot be read is a miss, one that cannot be written
is a refused put; both are counted in `stats`, which the engine's metrics read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar


@dataclass
class TierStats:
    """Counters of one store since it was made; the store updates them, metrics read them.

    Every `get` counts one hit or one miss; `errors` counts I/O failures besides (a failed get
    is also a miss, a failed put also returns False); `rejected` counts values larger than the
    whole budget; `evictions` counts entries dropped to make room.
    """

    hits: int = 0  # each hit is one value read
    misses: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    errors: int = 0
    rejected: int = 0

    def record_hit(self, num_bytes: int) -> None:
        self.hits += 1
        self.bytes_read += num_bytes

    def record_write(self, num_bytes: int) -> None:
        self.writes += 1
        self.bytes_written += num_bytes


class KVStore(ABC):
    """One medium that keeps serialized KV blocks by block hash (CPU RAM, disk, Redis).

    Values are opaque bytes: checking that they are what the key names is serde's job, so a
    store may hand back a corrupt value (decode_block turns it into a miss).
    """

    name: ClassVar[str]  # "cpu", "disk", "redis": the tier's label in metrics
    stats: TierStats  # set in __init__

    @abstractmethod
    def num_leading(self, keys: Sequence[bytes]) -> int:
        """How many leading keys of a hash chain this store holds, in one batched query.

        Changes nothing: neither LRU order nor `stats` (only `get` counts hits and misses); the
        scheduler may still decide not to load them.

        Args:
            keys: block hashes of consecutive blocks, first block first.

        Returns:
            n such that keys[:n] are all held and keys[n] (if any) is not.
        """

    @abstractmethod
    def get(self, key: bytes) -> bytes | None:
        """The value stored under `key`, and mark it most recently used.

        Returns:
            The value, or None when it is missing or cannot be read (counted, never raised).
        """

    @abstractmethod
    def put(self, key: bytes, value: bytes) -> bool:
        """Store `value` under `key` (replacing any), evicting least recently used entries.

        Returns:
            True when stored; False when not: larger than the whole budget (`rejected`) or an
            I/O error (`errors`). Never raises for I/O.
        """

    @abstractmethod
    def remove(self, key: bytes) -> None:
        """Forget `key`; nothing happens when it is not held."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for stores without resources
        """Release connections or handles; the store is not used afterwards."""

    def check_invariants(self) -> None:  # noqa: B027 - optional hook
        """Raise AssertionError if the store's index disagrees with itself (tests call it)."""
