"""The Redis tier against a real redis-server: the store contract, key namespaces, a server
that dies and comes back (reconnect with backoff on a fake clock), and one that is never there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.tiers.base import TierStats
from kvserve.kv.tiers.redis_store import (
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    RedisStore,
    namespace,
    redact_url,
)
from tests.redis_server import FakeClock, RedisServer, free_port

PARAMS = BlockHashParams(16, "model-a", "auto")
A, B, C, D = (bytes([i]) * 32 for i in (0xA0, 0xB0, 0xC0, 0xD0))


def test_put_get_and_counters(redis_url: str) -> None:
    store = RedisStore(redis_url, PARAMS)
    assert store.put(A, b"x" * 10)
    assert store.get(A) == b"x" * 10
    assert store.get(B) is None
    assert store.stats == TierStats(hits=1, misses=1, writes=1, bytes_read=10, bytes_written=10)
    store.close()


def test_keys_are_namespaced_by_format_version_and_hash_parameters(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, PARAMS)
    store.put(A, b"x")
    key = f"kvserve:kv:v1:{namespace(PARAMS)}:{A.hex()}".encode()
    assert store.redis_key(A) == key
    assert redis_server.client().keys("*") == [key]
    assert len(namespace(PARAMS)) == 16


def test_replacing_a_key_and_removing_it(redis_url: str) -> None:
    store = RedisStore(redis_url, PARAMS)
    store.put(A, b"old")
    assert store.put(A, b"new value")
    assert store.get(A) == b"new value"
    store.remove(A)
    store.remove(B)  # never there: nothing happens
    assert store.get(A) is None
    assert store.num_leading([A]) == 0
    assert store.stats.errors == 0


def test_num_leading_stops_at_the_first_gap_and_changes_nothing(redis_url: str) -> None:
    store = RedisStore(redis_url, PARAMS)
    for key in (A, B, D):
        store.put(key, b"x")
    assert store.num_leading([A, B, C, D]) == 2
    assert store.num_leading([B, A]) == 2
    assert store.num_leading([C, D]) == 0
    assert store.num_leading([]) == 0
    assert store.stats.hits == 0 and store.stats.misses == 0


@pytest.mark.parametrize(
    "other",
    [
        BlockHashParams(32, "model-a", "auto"),
        BlockHashParams(16, "model-b", "auto"),
        BlockHashParams(16, "model-a", "int8"),
    ],
)
def test_engines_with_other_hash_parameters_never_see_each_others_keys(
    redis_url: str, other: BlockHashParams
) -> None:
    mine, theirs = RedisStore(redis_url, PARAMS), RedisStore(redis_url, other)
    mine.put(A, b"mine")
    assert theirs.num_leading([A]) == 0
    assert theirs.get(A) is None
    theirs.put(A, b"theirs")
    assert mine.get(A) == b"mine"
    assert RedisStore(redis_url, PARAMS).get(A) == b"mine"  # equal parameters share keys


def test_a_dead_server_is_skipped_until_the_backoff_passes(redis_server: RedisServer) -> None:
    clock = FakeClock()
    store = RedisStore(redis_server.url, PARAMS, clock=clock)
    store.put(A, b"x")
    redis_server.kill()
    assert store.get(A) is None  # fails: down for FIRST_BACKOFF_S
    assert store.stats.errors == 1 and store.stats.misses == 1
    assert store.get(A) is None and not store.put(B, b"y") and store.num_leading([A]) == 0
    assert store.stats.errors == 1  # skipped while down: counted as misses, not errors
    assert store.stats.misses == 2 and store.stats.writes == 1
    clock.now += FIRST_BACKOFF_S
    assert store.get(A) is None  # tries again, fails: the delay doubles
    assert store.stats.errors == 2
    redis_server.start()  # back, empty
    clock.now += FIRST_BACKOFF_S
    assert not store.put(B, b"y")  # still backing off (2 * FIRST_BACKOFF_S)
    clock.now += FIRST_BACKOFF_S
    assert store.put(B, b"y")  # tries: up again
    assert store.get(B) == b"y" and store.num_leading([B]) == 1
    redis_server.kill()
    assert store.get(B) is None  # a new outage starts at the first delay again
    redis_server.start()
    clock.now += FIRST_BACKOFF_S
    assert store.put(C, b"z")
    assert store.stats.errors == 3


def test_the_backoff_doubles_up_to_its_maximum(redis_server: RedisServer) -> None:
    clock = FakeClock()
    store = RedisStore(redis_server.url, PARAMS, clock=clock)
    redis_server.kill()
    store.get(A)  # the first failure: down for FIRST_BACKOFF_S
    assert (FIRST_BACKOFF_S, MAX_BACKOFF_S) == (0.5, 30.0)
    for delay in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0):
        errors = store.stats.errors
        clock.now += delay - 0.25
        store.get(A)
        assert store.stats.errors == errors  # still backing off: skipped
        clock.now += 0.25
        store.get(A)
        assert store.stats.errors == errors + 1  # tried again and failed


def test_an_unreachable_server_at_start_is_a_warning_and_misses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger="kvserve"):
        store = RedisStore(url, PARAMS, clock=clock)
        assert store.get(A) is None
        assert not store.put(A, b"x")
        assert store.num_leading([A]) == 0
        store.remove(A)
    assert store.stats.errors == 1  # the start-up PING; the rest was skipped
    assert store.stats.misses == 1 and store.stats.writes == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "unreachable" in warnings[0] and "hunter2" not in warnings[0]
    assert ":***@127.0.0.1" in warnings[0]
    store.close()


def test_a_password_in_the_url_is_used_and_a_wrong_one_is_an_error(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", password="s3cret") as server:
        store = RedisStore(server.url, PARAMS)
        assert store.put(A, b"x") and store.get(A) == b"x"
        wrong = RedisStore(server.url.replace("s3cret", "wrong"), PARAMS)
        assert wrong.get(A) is None
        assert wrong.stats.errors == 1 and store.stats.errors == 0


def test_an_unparsable_url_names_the_field_without_the_password() -> None:
    with pytest.raises(ValueError, match="^kv_remote_url:") as error:
        RedisStore("redis://:hunter2@127.0.0.1:notaport/0", PARAMS)
    assert "hunter2" not in str(error.value)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("rediss://user:p%40w@h:1/0", "rediss://user:***@h:1/0"),
        ("redis://h:1/0?password=pw&db=2", "redis://h:1/0?password=***&db=2"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
