"""The local-disk tier (`kv_disk_dir`, `kv_disk_bytes`): one file per block, LRU by bytes.

    kv_disk_dir/
      3f/3fa09c...e1.kv       a block: its key in hex, fanned out by the first two hex chars
      3f/.3fa09c...e1.<pid>.<random>.tmp   a write in progress, renamed over the .kv (atomic)

The files are the truth; the index (key -> size, least recently used first) is this process's
view of them, rebuilt at start by scanning the directory (LRU order from mtime). Several
engines may share a directory: a lookup checks the files, a file another engine wrote is found,
a file another engine evicted is a miss. `get` refreshes a file's mtime so that the next start
orders it as recently used. The budget bounds what this process knows of: files another process
writes count once this process reads them.

No fsync: a power cut may leave a truncated file; its checksum (serde.py) makes it a miss.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from kvserve.kv.tiers.base import KVStore, TierStats

SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
# A temporary file this old is left over from a crash (a live write takes milliseconds); a
# younger one may be another engine's write in progress, so start-up leaves it alone.
STALE_TMP_SECONDS = 600.0


class DiskStore(KVStore):
    """Blocks as files under one directory, oldest files evicted first, within a byte budget."""

    name: ClassVar[str] = "disk"
    inline_writes: ClassVar[bool] = False

    def __init__(self, directory: str | Path, capacity_bytes: int) -> None:
        """Open (or create) the directory and index the blocks already in it.

        Args:
            directory: where the files live; created if missing.
            capacity_bytes: the budget for this process's files.

        Raises:
            ValueError: `kv_disk_dir` is empty, not a directory or cannot be created;
                `kv_disk_bytes` is negative.
        """
        if capacity_bytes < 0:
            raise ValueError(f"kv_disk_bytes must be >= 0, got {capacity_bytes}")
        if str(directory) == "":
            raise ValueError("kv_disk_dir must name a directory, got ''")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # exists as a file, or no permission to create it
            raise ValueError(
                f"kv_disk_dir {str(directory)!r} is not a usable directory: {e}"
            ) from e
        self.capacity_bytes = capacity_bytes
        self.stats = TierStats()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, oldest first
        self._num_bytes = 0
        self._lock = threading.Lock()
        try:
            self._scan()
        except OSError as e:
            raise ValueError(f"kv_disk_dir {str(directory)!r} cannot be read: {e}") from e
        with self._lock:
            self._evict_until(0)

    @property
    def num_bytes(self) -> int:
        """Bytes of the files in the index."""
        return self._num_bytes

    def occupancy(self) -> tuple[int, int, int]:
        return (len(self), self.num_bytes, self.capacity_bytes)

    def __len__(self) -> int:
        return len(self._index)

    def path_of(self, key: bytes) -> Path:
        """The file that holds `key` (which must not be empty)."""
        name = key.hex()
        return self.directory / name[:2] / (name + SUFFIX)

    def keys(self) -> list[bytes]:
        """The keys in the index, least recently used first (the eviction order)."""
        with self._lock:
            return list(self._index)

    def num_leading(self, keys: Sequence[bytes]) -> int:
        count = 0
        while count < len(keys) and self.path_of(keys[count]).is_file():
            count += 1
        return count

    def get(self, key: bytes) -> bytes | None:
        path = self.path_of(key)
        with self._lock:
            try:
                value = path.read_bytes()
            except FileNotFoundError:  # never written, or evicted by another engine
                self.stats.misses += 1
                self._forget(key)
                return None
            except OSError:
                self.stats.misses += 1
                self.stats.errors += 1
                return None
            self._touch(path)
            self._forget(key)
            self._remember(key, len(value))
            self._evict_until(0)
            self.stats.record_hit(len(value))
            return value

    def put(self, key: bytes, value: bytes) -> bool:
        """Write a temporary file without the lock (a lookup need not wait for the bytes),
        then, under the lock, make room and rename it into place. While it is written, the
        directory holds up to one value more than the budget."""
        if len(value) > self.capacity_bytes:
            with self._lock:
                self.stats.rejected += 1
            return False
        tmp = self._write_tmp(self.path_of(key), value)
        with self._lock:
            if tmp is None or not self._move_into_place(tmp, key, len(value)):
                self.stats.errors += 1
                return False
            self._remember(key, len(value))
            self.stats.record_write(len(value))
            return True

    def remove(self, key: bytes) -> None:
        with self._lock:
            self._forget(key)
            self._unlink(self.path_of(key))

    def check_invariants(self) -> None:
        with self._lock:
            assert self._num_bytes == sum(self._index.values())
            assert self._num_bytes <= self.capacity_bytes

    # ---- internals (called with the lock held, or from __init__) --------------------------

    def _write_tmp(self, path: Path, value: bytes) -> Path | None:
        """`value` in a new temporary file beside `path` (unique to this write); None on
        OSError. Needs no lock: no other write uses the name, no reader looks at it."""
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            path.parent.mkdir(exist_ok=True)
            tmp.write_bytes(value)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return None
        return tmp

    def _move_into_place(self, tmp: Path, key: bytes, size: int) -> bool:
        """Make room for `size` bytes and rename `tmp` over `key`'s file (atomic: a reader
        sees the old file or the new one); False on OSError."""
        self._forget(key)
        self._evict_until(size)
        try:
            os.replace(tmp, self.path_of(key))
        except OSError:
            self._unlink(tmp)
            return False
        return True

    def _remember(self, key: bytes, size: int) -> None:
        self._index[key] = size
        self._num_bytes += size

    def _forget(self, key: bytes) -> None:
        self._num_bytes -= self._index.pop(key, 0)

    def _evict_until(self, incoming: int) -> None:
        """Delete the oldest files until `incoming` more bytes fit in the budget."""
        while self._index and self._num_bytes + incoming > self.capacity_bytes:
            key = next(iter(self._index))
            self._forget(key)
            self._unlink(self.path_of(key))
            self.stats.evictions += 1

    def _touch(self, path: Path) -> None:
        """Refresh the mtime, so that the next start orders the file as recently used."""
        with contextlib.suppress(OSError):  # best effort: a read-only directory still serves reads
            os.utime(path)

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            self.stats.errors += 1

    def _scan(self) -> None:
        """Index the block files in the directory, oldest mtime first; delete stale temps."""
        found: list[tuple[int, bytes, int]] = []  # (mtime_ns, key, size)
        now = time.time()
        for fan in _entries(self.directory):
            if not fan.is_dir() or len(fan.name) != 2:
                continue
            for entry in _entries(Path(fan.path)):
                try:
                    stat = entry.stat()
                except OSError:  # vanished meanwhile
                    continue
                if entry.name.endswith(TMP_SUFFIX):
                    if now - stat.st_mtime > STALE_TMP_SECONDS:
                        self._unlink(Path(entry.path))
                    continue
                key = _key_of(entry.name, fan.name)
                if key is not None and entry.is_file():
                    found.append((stat.st_mtime_ns, key, stat.st_size))
        for _, key, size in sorted(found):
            self._remember(key, size)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    with os.scandir(directory) as entries:
        return list(entries)


def _key_of(file_name: str, fan_name: str) -> bytes | None:
    """The key a block file's name spells, None for any other file."""
    if not file_name.endswith(SUFFIX) or not file_name.startswith(fan_name):
        return None
    try:
        return bytes.fromhex(file_name.removesuffix(SUFFIX))
    except ValueError:
        return None
