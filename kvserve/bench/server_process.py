"""Start and stop a `kvserve serve` (or `kvserve cluster`) process on a free loopback port
(benchmarks and tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`python -m kvserve COMMAND ARGS --port P` with its output in `log`; waits for /health.

    `start_timeout_s` must cover model loading and, with `--compile`, every compiled bucket.
    `command` is "serve" or "cluster".
    """

    def __init__(
        self,
        args: list[str],
        log: str | Path,
        start_timeout_s: float = 180.0,
        command: str = "serve",
    ) -> None:
        self.args = list(args)
        self.command = command
        self.log = Path(log)
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start the server and return its base URL once /health answers 200."""
        command = [sys.executable, "-m", "kvserve", self.command, "--port", str(self.port)]
        command += self.args
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self._log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return self.base_url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(
            f"server did not start in {self.start_timeout_s:g} s: {self._log_tail()}"
        )

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a minute; the exit code."""
        if self.process is None:
            return None
        self.process.terminate()
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"
