"""The shared remote tier (`kv_remote_url`): blocks in a real Redis server that engines share.

    key    kvserve:kv:v1:<namespace>:<block hash hex>
           namespace: the first 16 hex chars of sha256 over the hash parameters
           (block size, model fingerprint, kv dtype); v1: serde's format version
    value  the serialized block (serde.py), as is

Engines that cannot share blocks (another model, kv dtype, block size or entry format) use
other namespaces, so they never see each other's keys. Redis bounds the pool itself (its
`maxmemory` and an LRU `maxmemory-policy`): this store keeps no index and counts no bytes held.
Each call is one round trip; `num_leading` is one pipeline of EXISTS.

A failed command (refused, timed out, any Redis error) counts `stats.errors`, is a miss or a
refused put, and takes the store down. While down it skips Redis: instant misses and refused
puts, not counted as errors; one warning per outage, an info line per failed retry. Once the
backoff delay has passed, the next call tries again; a success brings the store back up:

    up ──fails──> down, retry at now + delay ──delay passed, next call──> up (delay reset)
                                                                     └──> down (delay doubled)
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.tiers.base import KVStore, TierStats
from kvserve.kv.tiers.serde import FORMAT_VERSION

KEY_PREFIX = "kvserve:kv"
CONNECT_TIMEOUT_S = 0.5
READ_TIMEOUT_S = 2.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0

logger = logging.getLogger("kvserve")
T = TypeVar("T")


class RedisStore(KVStore):
    """Blocks in a Redis server, under keys namespaced by the engine's hash parameters.

    Args:
        url: `kv_remote_url`, e.g. redis://:password@127.0.0.1:6379/0 (as redis-py reads it).
        params: the engine's hash parameters; they choose the key namespace.
        clock: seconds, for the reconnect backoff (tests pass a fake one).

    Raises:
        ValueError: `kv_remote_url` cannot be parsed. An unreachable server is no error: the
            store logs a warning and starts down.
    """

    name: ClassVar[str] = "redis"

    def __init__(
        self, url: str, params: BlockHashParams, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.url = redact_url(url)  # for messages: never the password
        self.stats = TierStats()
        self._prefix = f"{KEY_PREFIX}:v{FORMAT_VERSION}:{namespace(params)}:".encode()
        self._password = urlsplit(url).password
        self._clock = clock
        self._lock = threading.Lock()  # the counters and the backoff state
        self._delay = 0.0  # seconds of the current backoff; 0.0 while up
        self._retry_at = 0.0
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=READ_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),  # the store's own backoff decides when to retry
            )
        except ValueError as error:
            raise ValueError(f"kv_remote_url: cannot be parsed ({self.url!r}): {error}") from None
        self._call(self._client.ping)

    @property
    def is_up(self) -> bool:
        """Whether the last call reached Redis (False while down and backing off)."""
        with self._lock:
            return self._delay == 0.0

    def redis_key(self, key: bytes) -> bytes:
        """The Redis key that holds block hash `key`."""
        return self._prefix + key.hex().encode()

    def num_leading(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0

        def exists() -> list[int]:
            pipeline = self._client.pipeline(transaction=False)
            for key in keys:
                pipeline.exists(self.redis_key(key))
            return list(pipeline.execute())

        found = self._call(exists) or []
        count = 0
        while count < len(found) and found[count]:
            count += 1
        return count

    def get(self, key: bytes) -> bytes | None:
        # bytes: the client does not decode responses
        value = cast("bytes | None", self._call(lambda: self._client.get(self.redis_key(key))))
        with self._lock:
            if value is None:
                self.stats.misses += 1
            else:
                self.stats.record_hit(len(value))
        return value

    def put(self, key: bytes, value: bytes) -> bool:
        if not self._call(lambda: self._client.set(self.redis_key(key), value)):
            return False
        with self._lock:
            self.stats.record_write(len(value))
        return True

    def remove(self, key: bytes) -> None:
        self._call(lambda: self._client.delete(self.redis_key(key)))

    def close(self) -> None:
        self._client.close()

    def _call(self, command: Callable[[], T]) -> T | None:
        """`command()`, or None when it failed or the store is down and still backing off."""
        with self._lock:
            if self._delay > 0.0 and self._clock() < self._retry_at:
                return None
        try:
            result = command()
        except (RedisError, OSError) as error:
            self._went_down(error)
            return None
        self._came_up()
        return result

    def _went_down(self, error: Exception) -> None:
        with self._lock:
            self.stats.errors += 1
            was_up = self._delay == 0.0
            self._delay = FIRST_BACKOFF_S if was_up else min(2 * self._delay, MAX_BACKOFF_S)
            self._retry_at = self._clock() + self._delay
            delay = self._delay
        message = f"{type(error).__name__}: {error}"
        if self._password:
            message = message.replace(self._password, "***")
        if was_up:
            logger.warning(
                "Redis KV tier %s unreachable (%s); running without it, retrying with backoff",
                self.url,
                message,
            )
        else:  # a retry failed: at most one line per backoff delay
            logger.info(
                "Redis KV tier %s still unreachable (%s); next try in %.1f s",
                self.url,
                message,
                delay,
            )

    def _came_up(self) -> None:
        with self._lock:
            was_down = self._delay > 0.0
            self._delay = 0.0
        if was_down:
            logger.info("Redis KV tier %s is back", self.url)


def namespace(params: BlockHashParams) -> str:
    """16 hex chars naming the hash parameters: engines share keys only when these are equal."""
    block_size, model_fingerprint, kv_cache_dtype = params
    text = f"{block_size}\0{model_fingerprint}\0{kv_cache_dtype}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def redact_url(url: str) -> str:
    """`url` with its password (in the netloc or a `password=` query) replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))
