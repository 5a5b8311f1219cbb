"""The background writer (writer.py): puts in submit order on its own thread, a queue bounded
in bytes that drops (and counts) instead of waiting, close drains and joins, a store that
raises is counted and does not stop the thread. Stores here block on an Event, so no test
depends on how fast the thread runs."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.kv.tiers.base import KVStore, TierStats
from kvserve.kv.tiers.cpu import CPUStore
from kvserve.kv.tiers.disk import DiskStore
from kvserve.kv.tiers.tiered import TieredConnector
from kvserve.kv.tiers.writer import BackgroundWriter
from tests.unit.test_kv_tiers_chain import HASHES, PARAMS, caches

FAIL = b"fail"


class GatedStore(KVStore):
    """Records the keys put into it; each put waits until `gate` is set; a put of one of
    `fail_keys` raises."""

    name: ClassVar[str] = "gated"
    inline_writes: ClassVar[bool] = False

    def __init__(self, open_gate: bool = False) -> None:
        self.stats = TierStats()
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.written: list[bytes] = []
        self.fail_keys = {FAIL}

    def num_leading(self, keys: Sequence[bytes]) -> int:
        return 0

    def get(self, key: bytes) -> bytes | None:
        return None

    def put(self, key: bytes, value: bytes) -> bool:
        self.gate.wait(timeout=60)  # a bound for a broken test, never reached when it passes
        if key in self.fail_keys:
            raise RuntimeError("injected fault")
        self.written.append(key)
        self.stats.record_write(len(value))
        return True

    def remove(self, key: bytes) -> None:
        return None


@pytest.fixture
def writer() -> BackgroundWriter:
    return BackgroundWriter(max_queued_bytes=100)


def test_writes_are_put_in_submit_order() -> None:
    store, writer = GatedStore(open_gate=True), BackgroundWriter()
    keys = [bytes([i]) for i in range(50)]
    for key in keys:
        assert writer.submit(store, key, b"x" * 10)
    assert writer.flush(timeout=60)
    assert store.written == keys
    assert store.stats.bytes_written == 500
    writer.close()


def test_a_full_queue_drops_and_counts_without_waiting(writer: BackgroundWriter) -> None:
    store = GatedStore()
    assert writer.submit(store, b"a", b"x" * 60)  # taken by the thread, which waits at the gate
    assert not writer.submit(store, b"b", b"x" * 60)  # 120 bytes > 100: dropped
    assert store.written == []  # the drop did not wait for the gate
    assert writer.submit(store, b"c", b"x" * 40)  # 100 bytes fit exactly
    assert store.stats.dropped_writes == 1
    assert writer.num_pending == 2
    store.gate.set()
    assert writer.flush(timeout=60)
    assert store.written == [b"a", b"c"]
    assert (writer.num_pending, store.stats.dropped_writes) == (0, 1)
    writer.close()


def test_a_payload_larger_than_the_bound_is_dropped(writer: BackgroundWriter) -> None:
    store = GatedStore(open_gate=True)
    assert not writer.submit(store, b"a", b"x" * 101)
    assert store.stats.dropped_writes == 1
    writer.close()
    assert store.written == []


def test_close_writes_what_is_queued_then_joins(writer: BackgroundWriter) -> None:
    store = GatedStore()
    for key in (b"a", b"b", b"c"):
        assert writer.submit(store, key, b"x" * 10)
    closer = threading.Thread(target=writer.close)
    closer.start()
    closer.join(timeout=0.05)
    assert closer.is_alive()  # close waits for the writes still queued
    store.gate.set()
    closer.join(timeout=60)
    assert not closer.is_alive()
    assert store.written == [b"a", b"b", b"c"]
    assert not writer.is_alive
    assert not writer.submit(store, b"d", b"x")  # a closed writer takes no more
    assert store.stats.dropped_writes == 1


def test_a_store_that_raises_is_counted_and_the_thread_goes_on(
    writer: BackgroundWriter, caplog: pytest.LogCaptureFixture
) -> None:
    store = GatedStore(open_gate=True)
    assert writer.submit(store, FAIL, b"x")
    assert writer.submit(store, b"ok", b"x")
    assert writer.flush(timeout=60)
    assert store.written == [b"ok"]
    assert store.stats.failed_writes == 1
    assert writer.is_alive
    assert "a background put raised" in caplog.text
    writer.close()


def test_a_writer_dropped_without_close_stops_its_thread() -> None:
    before = set(threading.enumerate())
    writer = BackgroundWriter()
    (thread,) = set(threading.enumerate()) - before
    store = GatedStore(open_gate=True)
    assert writer.submit(store, b"a", b"x")
    del writer  # its finalizer stops the queue; the thread writes what is queued and ends
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert store.written == [b"a"]


def test_the_bound_is_checked() -> None:
    with pytest.raises(ValueError, match="^max_queued_bytes"):
        BackgroundWriter(max_queued_bytes=-1)


def test_the_chain_puts_cpu_in_the_step_and_slow_tiers_in_the_background() -> None:
    cpu, slow = CPUStore(2**20), GatedStore()
    connector = TieredConnector([cpu, slow], PARAMS)
    kv = caches()
    connector.save_blocks(kv, [BlockTransfer(1, HASHES[0]), BlockTransfer(2, HASHES[1])])
    assert cpu.keys() == HASHES[:2]  # written before save_blocks returned
    assert slow.written == []  # queued: save_blocks did not wait for the slow put
    assert not connector.flush(timeout=0.01)
    slow.gate.set()
    assert connector.flush(timeout=60)
    assert slow.written == HASHES[:2]
    assert slow.stats.bytes_written == cpu.num_bytes  # the same payloads
    connector.close()


def test_close_finishes_the_disk_writes_and_stops_the_thread(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    disk = DiskStore(tmp_path / "kv", 2**20)
    connector = TieredConnector([disk], PARAMS)
    assert [t.name for t in set(threading.enumerate()) - before] == ["kvserve-kv-writer"]
    connector.save_blocks(caches(), [BlockTransfer(i, HASHES[i - 1]) for i in (1, 2, 3)])
    connector.close()
    assert [disk.path_of(key).is_file() for key in HASHES[:3]] == [True, True, True]
    assert disk.keys() == HASHES[:3]  # written in order
    assert set(threading.enumerate()) - before == set()


def test_a_chain_of_memory_tiers_starts_no_thread() -> None:
    before = set(threading.enumerate())
    connector = TieredConnector([CPUStore(2**20)], PARAMS)
    assert set(threading.enumerate()) - before == set()
    assert connector.flush(timeout=0)
    connector.close()
