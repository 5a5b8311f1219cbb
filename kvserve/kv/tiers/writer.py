"""The bounded background writer: puts into the slow tiers (disk, Redis) off the step.

    engine thread   save_blocks: read_block + encode_block (the pool block may be reused
                    right after the step), then submit(store, key, payload): never waits
    writer thread   store.put(key, payload), one at a time, oldest first

    queued:  [ w5 w4 w3 ] -> writing: w2      num_bytes = len(w5 .. w2 payloads) <= max_bytes
    submit(w6) that would pass max_bytes: dropped, counted in store.stats.dropped_writes

The bound is in bytes, not entries: one block's payload is a few KiB for a tiny test model and
MiBs for a large one, so only a byte bound bounds the memory the queue may pin. A payload
counts from `submit` until its put returns (it stays alive until then).

A block queued but not yet written is a miss for a lookup (its tokens are recomputed); a store
never shows a half-written value (disk renames a finished file into place; CPU and Redis
replace a value whole), so a lookup sees a block entirely or not at all.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from typing import NamedTuple

from kvserve.kv.tiers.base import KVStore

logger = logging.getLogger("kvserve")

# Enough for one step's saves of a large prefill chunk (2,048 tokens of SmolLM2-135M in fp32
# are 90 MiB), small next to a host's RAM.
DEFAULT_MAX_QUEUED_BYTES = 256 * 2**20


class _Write(NamedTuple):
    store: KVStore
    key: bytes
    payload: bytes


class _WriteQueue:
    """What the writer thread shares with `BackgroundWriter`. The thread holds this object,
    not the writer, so a writer dropped without `close()` still stops its thread (finalizer)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.cond = threading.Condition()
        self.writes: deque[_Write] = deque()  # oldest first
        self.num_pending = 0  # queued + being written
        self.num_bytes = 0  # payload bytes of the pending writes
        self.stopping = False

    def offer(self, write: _Write) -> bool:
        """Queue `write` unless the queue is stopping or it would pass `max_bytes`."""
        with self.cond:
            if self.stopping or self.num_bytes + len(write.payload) > self.max_bytes:
                return False
            self.writes.append(write)
            self.num_pending += 1
            self.num_bytes += len(write.payload)
            self.cond.notify_all()
            return True

    def stop(self) -> None:
        """Accept no more writes; the thread exits once the queued ones are written."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def run(self) -> None:
        """The thread's loop: put each write, oldest first, until stopped and drained."""
        while (write := self._next()) is not None:
            try:
                write.store.put(write.key, write.payload)
            except Exception:  # a store broke its contract (put never raises): count, go on
                write.store.stats.failed_writes += 1
                if write.store.stats.failed_writes == 1:
                    logger.exception("KV tier %r: a background put raised", write.store.name)
            with self.cond:
                self.num_pending -= 1
                self.num_bytes -= len(write.payload)
                self.cond.notify_all()

    def _next(self) -> _Write | None:
        with self.cond:
            self.cond.wait_for(lambda: bool(self.writes) or self.stopping)
            return self.writes.popleft() if self.writes else None


class BackgroundWriter:
    """One daemon thread that puts serialized blocks into stores, behind a queue bounded in
    bytes. The engine thread submits; only the writer thread puts, so a store sees one writer
    thread and one reader thread (base.py)."""

    def __init__(self, max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES) -> None:
        """Start the thread.

        Args:
            max_queued_bytes: the most payload bytes queued or being written at once.

        Raises:
            ValueError: `max_queued_bytes` is negative.
        """
        if max_queued_bytes < 0:
            raise ValueError(f"max_queued_bytes must be >= 0, got {max_queued_bytes}")
        self._queue = _WriteQueue(max_queued_bytes)
        self._thread = threading.Thread(
            target=self._queue.run, name="kvserve-kv-writer", daemon=True
        )
        self._thread.start()
        self._stop = weakref.finalize(self, self._queue.stop)

    @property
    def num_pending(self) -> int:
        """Writes queued or being written."""
        return self._queue.num_pending

    @property
    def is_alive(self) -> bool:
        """Whether the thread runs (False once `close` returned)."""
        return self._thread.is_alive()

    def submit(self, store: KVStore, key: bytes, payload: bytes) -> bool:
        """Queue `store.put(key, payload)` for the thread; never waits.

        Returns:
            True when queued; False when dropped (counted in `store.stats.dropped_writes`):
            the queue is full, or the writer is closed.
        """
        if self._queue.offer(_Write(store, key, payload)):
            return True
        store.stats.dropped_writes += 1
        return False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write submitted so far is done (tests, benchmarks, close).

        Returns:
            True when all are done; False when `timeout` seconds passed first.
        """
        queue = self._queue
        with queue.cond:
            return queue.cond.wait_for(lambda: queue.num_pending == 0, timeout)

    def close(self) -> None:
        """Write what is queued, then stop and join the thread; later submits are dropped."""
        self._stop()
        self._thread.join()
