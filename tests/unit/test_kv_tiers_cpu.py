"""The host-RAM tier: exact LRU eviction order, byte accounting, chains with gaps."""

from __future__ import annotations

import pytest

from kvserve.kv.tiers.base import TierStats
from kvserve.kv.tiers.cpu import CPUStore


def test_put_get_and_counters() -> None:
    store = CPUStore(100)
    assert store.put(b"a", b"x" * 10)
    assert store.get(b"a") == b"x" * 10
    assert store.get(b"b") is None
    assert store.stats == TierStats(hits=1, misses=1, writes=1, bytes_read=10, bytes_written=10)
    assert store.num_bytes == 10 and len(store) == 1
    store.check_invariants()


def test_eviction_is_least_recently_used_by_bytes() -> None:
    store = CPUStore(30)
    for key in (b"a", b"b", b"c"):
        assert store.put(key, b"x" * 10)
    assert store.get(b"a") is not None  # a becomes the newest: order b, c, a
    assert store.keys() == [b"b", b"c", b"a"]
    assert store.put(b"d", b"y" * 15)  # needs 15 free bytes: evicts b, then c
    assert store.keys() == [b"a", b"d"]
    assert store.num_bytes == 25
    assert store.stats.evictions == 2
    store.check_invariants()


def test_a_put_fills_the_budget_exactly() -> None:
    store = CPUStore(20)
    store.put(b"a", b"x" * 10)
    store.put(b"b", b"x" * 10)
    assert store.keys() == [b"a", b"b"] and store.num_bytes == 20
    assert store.stats.evictions == 0


def test_replacing_a_key_counts_its_bytes_once() -> None:
    store = CPUStore(30)
    store.put(b"a", b"x" * 10)
    store.put(b"b", b"x" * 10)
    assert store.put(b"a", b"z" * 20)  # 10 freed by the old a, so nothing is evicted
    assert store.keys() == [b"b", b"a"]
    assert store.num_bytes == 30 and store.stats.evictions == 0
    assert store.get(b"a") == b"z" * 20
    store.check_invariants()


def test_a_value_larger_than_the_budget_is_rejected_and_evicts_nothing() -> None:
    store = CPUStore(10)
    store.put(b"a", b"x" * 10)
    assert not store.put(b"b", b"x" * 11)
    assert store.keys() == [b"a"]
    assert store.stats.rejected == 1 and store.stats.writes == 1


def test_a_zero_budget_holds_nothing() -> None:
    store = CPUStore(0)
    assert not store.put(b"a", b"x")
    assert store.num_leading([b"a"]) == 0


def test_num_leading_stops_at_the_first_gap_and_changes_nothing() -> None:
    store = CPUStore(100)
    for key in (b"h0", b"h1", b"h3"):
        store.put(key, b"x")
    assert store.num_leading([b"h0", b"h1", b"h2", b"h3"]) == 2
    assert store.num_leading([b"h1", b"h0"]) == 2
    assert store.num_leading([b"h2", b"h3"]) == 0
    assert store.num_leading([]) == 0
    assert store.keys() == [b"h0", b"h1", b"h3"]  # LRU order untouched
    assert store.stats.hits == 0 and store.stats.misses == 0


def test_remove() -> None:
    store = CPUStore(100)
    store.put(b"a", b"x" * 10)
    store.remove(b"a")
    store.remove(b"never-there")
    assert store.get(b"a") is None
    assert store.num_bytes == 0 and len(store) == 0
    store.check_invariants()


def test_negative_capacity_names_the_field() -> None:
    with pytest.raises(ValueError, match="kv_cpu_bytes"):
        CPUStore(-1)
