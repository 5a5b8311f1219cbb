"""The contract of a KV store below the block pool: bytes in, bytes out, keyed by block hash.

A store keeps serialized blocks (serde.py) under their chained block hash (kv/block_hash.py),
so a lookup walks a request's hash chain and stops at the first key it lacks:

    keys:    h0  h1  h2  h3  h4
    held:    h0  h1  --  h3  --
    num_leading(keys) == 2          (h3 is useless without h2: its prefix is not there)

Stores never raise for I/O: a value that cannot be read is a miss, one that cannot be written
is a refused put; both are counted in `stats`, which the engine's metrics read.

Threads: a store is used by two threads at once, the engine thread (lookups, inline puts) and
the background writer's thread (puts of stores with `inline_writes` False, writer.py). Every
method must be safe under that (cpu.py and disk.py hold a lock around their index), and a get
must never return a half-written value (a put replaces a value whole, or not at all).
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
    whole budget; `evictions` counts entries dropped to make room. The background writer
    counts `dropped_writes` (its queue was full: the block was never offered to the store) and
    `failed_writes` (a put that raised, against the contract). Each counter has one writing
    thread, or is written under the store's lock.
    """

    hits: int = 0  # each hit is one value read
    misses: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    errors: int = 0
    rejected: int = 0
    dropped_writes: int = 0  # engine thread only (BackgroundWriter.submit)
    failed_writes: int = 0  # writer thread only

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
    # True: `put` is a memory copy, done in the step; False (a store does I/O unless it says
    # otherwise): the tier chain hands `put` to the background writer (writer.py), which
    # drops it when its queue is full.
    inline_writes: ClassVar[bool] = False
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

    def occupancy(self) -> tuple[int, int, int]:
        """(entries, bytes held, byte budget) now; zeros for a store that keeps no count."""
        return (0, 0, 0)

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for stores without resources
        """Release connections or handles; the store is not used afterwards."""

    def check_invariants(self) -> None:  # noqa: B027 - optional hook
        """Raise AssertionError if the store's index disagrees with itself (tests call it)."""
