"""A private `redis-server` for one benchmark run (`--redis auto`): a free loopback port, no
persistence, stopped when the run ends.

    with RedisServer() as url:        # "redis://127.0.0.1:PORT/0"
        ...                           # engines with kv_remote_url=url
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


class RedisServer:
    """Start `redis-server` on entering, stop it on leaving; `url` while it runs.

    Raises:
        ValueError: no `redis-server` on PATH (names --redis).
        RuntimeError: the server did not answer PING within `startup_timeout_s` (its log tail).
    """

    def __init__(self, startup_timeout_s: float = 10.0) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise ValueError(
                "--redis auto: needs redis-server on PATH (Debian: apt-get install "
                "redis-server; or give --kv-remote-url)"
            )
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._directory: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> str:
        self._directory = tempfile.TemporaryDirectory(prefix="kvserve-redis-")
        log = Path(self._directory.name) / "redis.log"
        self.port = free_port()
        command = [
            self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self._directory.name,
            "--logfile", str(log),
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while not ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                self.__exit__(None, None, None)
                raise RuntimeError(f"redis-server did not start on port {self.port}: {tail}")
            time.sleep(0.05)
        return self.url

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ping(port: int) -> bool:
    """True if a Redis server on 127.0.0.1:`port` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
