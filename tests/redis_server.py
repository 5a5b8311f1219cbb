"""A real Redis for the remote tier's tests: Debian's `redis-server` on a free loopback port.

    with RedisServer(tmp_path) as server:     # started, answers PING, empty, no persistence
        server.url                             # redis://127.0.0.1:<port>/0
        server.kill()                          # SIGKILL: the tier sees a dead server
        server.start()                         # again, on the same port, empty
    # stopped (SIGTERM, then wait)

`make test` installs redis-server (the Makefile's `redis-server` target); without it these
tests fail, saying so, rather than skip.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest
import redis

from kvserve.bench.redis_server import free_port as free_port  # re-exported to the tests

READY_TIMEOUT_S = 10.0  # a generous bound on start-up; a healthy server answers in milliseconds


class RedisServer:
    """One redis-server process bound to 127.0.0.1, its files under `directory`.

    Args:
        directory: its working directory and log file (created if missing).
        password: ask clients for this password (`requirepass`); None: no password.
    """

    def __init__(self, directory: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed; `make test` installs it (Debian's redis-server "
                "package, the Makefile's redis-server target)",
                pytrace=False,
            )
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain client, for a test to look at or tamper with the entries."""
        return redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=5.0)

    def start(self) -> None:
        """Start the server (empty) and wait until it answers PING."""
        assert self._process is None, "already running"
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port)]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        if self.password:
            args += ["--requirepass", self.password]
        with open(self.directory / "redis.log", "ab") as log:
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def kill(self) -> None:
        """SIGKILL the server and reap it: clients see refused connections from now on."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def stop(self) -> None:
        """SIGTERM the server and wait for it (SIGKILL if it hangs)."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=READY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def __enter__(self) -> RedisServer:
        for _ in range(2):  # the free port may have been taken meanwhile: try another
            try:
                self.start()
                return self
            except RuntimeError:
                self.port = free_port()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        client = self.client()
        try:
            while True:
                if self._process.poll() is not None:
                    log = (self.directory / "redis.log").read_text(errors="replace")
                    self._process = None
                    raise RuntimeError(f"redis-server exited at start:\n{log[-2000:]}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise
                time.sleep(0.01)
        finally:
            client.close()


class FakeClock:
    """Seconds that pass only when a test says so: `RedisStore(..., clock=clock)`, then
    `clock.now += RETRY_DELAY` instead of sleeping through the reconnect backoff."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
