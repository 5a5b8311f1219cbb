"""The host-RAM tier (`kv_cpu_bytes`): serialized blocks in an LRU by bytes.

    _entries: OrderedDict  oldest (evicted first) ... newest (last put or get)
    num_bytes == sum of len(value) <= capacity_bytes

One lock guards the index, so the engine thread and a background writer may share the store.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

from kvserve.kv.tiers.base import KVStore, TierStats


class CPUStore(KVStore):
    """Blocks in host memory, least recently used evicted first, within a byte budget."""

    name: ClassVar[str] = "cpu"
    inline_writes: ClassVar[bool] = True

    def __init__(self, capacity_bytes: int) -> None:
        """
        Args:
            capacity_bytes: the budget for values (keys and overhead not counted).

        Raises:
            ValueError: `kv_cpu_bytes` (capacity_bytes) is negative.
        """
        if capacity_bytes < 0:
            raise ValueError(f"kv_cpu_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.stats = TierStats()
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._num_bytes = 0
        self._lock = threading.Lock()

    @property
    def num_bytes(self) -> int:
        """Bytes of the values held now."""
        return self._num_bytes

    def occupancy(self) -> tuple[int, int, int]:
        return (len(self), self.num_bytes, self.capacity_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def num_leading(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            count = 0
            while count < len(keys) and keys[count] in self._entries:
                count += 1
            return count

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.record_hit(len(value))
            return value

    def put(self, key: bytes, value: bytes) -> bool:
        with self._lock:
            if len(value) > self.capacity_bytes:
                self.stats.rejected += 1
                return False
            self._pop(key)
            while self._num_bytes + len(value) > self.capacity_bytes:
                self._pop(next(iter(self._entries)))
                self.stats.evictions += 1
            self._entries[key] = value
            self._num_bytes += len(value)
            self.stats.record_write(len(value))
            return True

    def remove(self, key: bytes) -> None:
        with self._lock:
            self._pop(key)

    def keys(self) -> list[bytes]:
        """The keys held, least recently used first (the eviction order)."""
        with self._lock:
            return list(self._entries)

    def check_invariants(self) -> None:
        with self._lock:
            assert self._num_bytes == sum(len(v) for v in self._entries.values())
            assert self._num_bytes <= self.capacity_bytes

    def _pop(self, key: bytes) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self._num_bytes -= len(value)
