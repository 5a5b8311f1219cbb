"""The local-disk tier: file layout, LRU by bytes, restarts, a directory shared by two stores,
and failures that are counted instead of raised."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvserve.kv.tiers.base import TierStats
from kvserve.kv.tiers.disk import STALE_TMP_SECONDS, DiskStore

REPO_ROOT = Path(__file__).resolve().parents[2]  # the subprocess imports this checkout
A, B, C, D = (bytes([i]) * 32 for i in (0xA0, 0xB0, 0xC0, 0xD0))


def set_mtime(store: DiskStore, key: bytes, seconds: int) -> None:
    os.utime(store.path_of(key), ns=(seconds * 10**9, seconds * 10**9))


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_one_file_per_key_fanned_out_by_its_first_hex_chars(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1000)
    assert store.put(A, b"x" * 10)
    assert files_under(tmp_path) == [f"a0/{'a0' * 32}.kv"]  # no temporary file left
    assert store.path_of(A).read_bytes() == b"x" * 10
    assert store.get(A) == b"x" * 10
    assert store.get(B) is None
    assert store.stats == TierStats(hits=1, misses=1, writes=1, bytes_read=10, bytes_written=10)
    store.check_invariants()


def test_eviction_deletes_the_least_recently_used_files(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 30)
    for key in (A, B, C):
        assert store.put(key, b"x" * 10)
    assert store.get(A) is not None  # order: B, C, A
    assert store.put(D, b"y" * 15)  # evicts B, then C
    assert store.keys() == [A, D]
    assert store.num_bytes == 25 and store.stats.evictions == 2
    assert not store.path_of(B).exists() and not store.path_of(C).exists()
    store.check_invariants()


def test_replacing_a_key_and_rejecting_an_oversized_value(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 20)
    store.put(A, b"x" * 10)
    store.put(B, b"x" * 10)
    assert store.put(A, b"z" * 10)  # same size: nothing evicted, A newest
    assert store.keys() == [B, A] and store.num_bytes == 20
    assert not store.put(C, b"x" * 21)
    assert store.stats.rejected == 1 and store.stats.evictions == 0
    assert store.get(A) == b"z" * 10


def test_num_leading_checks_the_files_and_changes_nothing(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1000)
    for key in (A, B, D):
        store.put(key, b"x")
    assert store.num_leading([A, B, C, D]) == 2
    store.path_of(B).unlink()  # evicted by another engine
    assert store.num_leading([A, B]) == 1
    assert store.num_leading([]) == 0
    assert store.keys() == [A, B, D]
    assert store.stats.hits == 0 and store.stats.misses == 0


def test_get_refreshes_the_mtime(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1000)
    store.put(A, b"x")
    set_mtime(store, A, 100)
    store.get(A)
    assert store.path_of(A).stat().st_mtime_ns > 100 * 10**9


def test_a_new_store_finds_the_files_in_mtime_order(tmp_path: Path) -> None:
    first = DiskStore(tmp_path, 1000)
    for key, seconds in ((A, 300), (B, 100), (C, 200)):
        first.put(key, b"x" * 10)
        set_mtime(first, key, seconds)
    second = DiskStore(tmp_path, 1000)
    assert second.keys() == [B, C, A]
    assert second.num_bytes == 30 and len(second) == 3
    assert second.num_leading([A, B, C]) == 3
    assert second.get(B) == b"x" * 10  # B becomes the newest, also for the next start
    assert DiskStore(tmp_path, 1000).keys() == [C, A, B]
    second.check_invariants()


def test_a_new_store_with_a_smaller_budget_evicts_the_oldest(tmp_path: Path) -> None:
    first = DiskStore(tmp_path, 1000)
    for key, seconds in ((A, 100), (B, 200), (C, 300)):
        first.put(key, b"x" * 10)
        set_mtime(first, key, seconds)
    second = DiskStore(tmp_path, 20)
    assert second.keys() == [B, C]
    assert files_under(tmp_path) == sorted(
        str(second.path_of(k).relative_to(tmp_path)) for k in (B, C)
    )
    second.check_invariants()


def test_two_stores_share_a_directory(tmp_path: Path) -> None:
    one, two = DiskStore(tmp_path, 1000), DiskStore(tmp_path, 1000)
    one.put(A, b"from one")
    assert two.num_leading([A]) == 1  # written after two started
    assert two.get(A) == b"from one"
    assert two.keys() == [A] and two.num_bytes == 8
    two.remove(A)
    assert one.num_leading([A]) == 0
    assert one.get(A) is None  # a miss, and one forgets it
    assert one.keys() == [] and one.num_bytes == 0
    assert one.stats.misses == 1 and one.stats.errors == 0
    one.check_invariants()
    two.check_invariants()


def test_a_file_another_process_wrote_is_found(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1000)
    script = (
        "import sys; from kvserve.kv.tiers.disk import DiskStore; "
        "assert DiskStore(sys.argv[1], 1000).put(bytes([0xA0]) * 32, b'other process')"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=REPO_ROOT)
    assert store.num_leading([A]) == 1
    assert store.get(A) == b"other process"
    store.check_invariants()


def test_start_up_deletes_stale_temporary_files_and_ignores_other_files(tmp_path: Path) -> None:
    DiskStore(tmp_path, 1000).put(A, b"x")
    fan = tmp_path / "a0"
    stale, fresh = fan / f".{'a0' * 32}.1.dead.tmp", fan / f".{'a0' * 32}.2.live.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = int((os.path.getmtime(stale) - STALE_TMP_SECONDS - 10) * 10**9)
    os.utime(stale, ns=(old, old))
    (tmp_path / "README").write_text("not a block")
    (fan / "notes.kv").write_text("not hex")
    (tmp_path / "zz").mkdir()
    store = DiskStore(tmp_path, 1000)
    assert store.keys() == [A] and store.num_bytes == 1
    assert not stale.exists() and fresh.exists()  # fresh may be another engine's write


def test_a_failed_write_is_counted_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path, 1000)
    store.put(A, b"x" * 10)

    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    assert not store.put(B, b"y" * 10)
    assert store.stats.errors == 1 and store.stats.writes == 1
    assert store.keys() == [A] and store.num_bytes == 10
    assert files_under(tmp_path) == [f"a0/{'a0' * 32}.kv"]  # the temporary file is gone
    monkeypatch.undo()
    assert store.get(A) == b"x" * 10  # reads go on
    store.check_invariants()


def test_an_unwritable_directory_fails_soft(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1000)
    store.put(A, b"x")
    for path in (tmp_path, tmp_path / "a0"):
        path.chmod(0o555)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        assert not store.put(B, b"y")  # a new fan-out directory
        assert not store.put(A, b"z")  # an existing one
        assert store.stats.errors == 2
        assert store.get(A) == b"x"
    finally:
        for path in (tmp_path, tmp_path / "a0"):
            path.chmod(0o755)


def test_an_unreadable_entry_is_a_counted_miss(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1000)
    store.path_of(A).mkdir(parents=True)  # a directory where the file should be
    assert store.num_leading([A]) == 0
    assert store.get(A) is None
    assert store.stats.misses == 1 and store.stats.errors == 1


def test_remove(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1000)
    store.put(A, b"x")
    store.remove(A)
    store.remove(B)
    assert not store.path_of(A).exists()
    assert store.keys() == [] and store.num_bytes == 0


def test_bad_arguments_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kv_disk_bytes"):
        DiskStore(tmp_path, -1)
    with pytest.raises(ValueError, match="kv_disk_dir"):
        DiskStore("", 1000)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="kv_disk_dir"):
        DiskStore(tmp_path / "file", 1000)


def test_a_missing_directory_is_created(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "a" / "b", 1000)
    assert store.put(A, b"x")
    assert (tmp_path / "a" / "b").is_dir()
