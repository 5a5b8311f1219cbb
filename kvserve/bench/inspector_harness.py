"""The harness of `kvserve bench inspector` (inspector_bench.py): a server on a thread, clients
that keep it busy, what watches the inspector, and the clock on the engine's steps.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import socket
import threading
import time
from typing import Any

import httpx
from fastapi.responses import JSONResponse

from kvserve.bench import workloads as wl

POLL_S = 0.4  # the page's poll interval (static/kv.js)


class StepClock:
    """Times every engine loop step (`AsyncEngine._step`), the inspector's copies (engine
    thread) and its answers to /kv/state (event loop: the state's JSON built and encoded)."""

    def __init__(self, async_engine: Any) -> None:
        self.phase = -1  # the phase's index; -1 outside the phases
        self.steps: list[tuple[int, float, int]] = []  # (phase, seconds, scheduled tokens)
        self.copies: list[tuple[int, float]] = []
        self.answers: list[tuple[int, float]] = []
        self._time_answers()
        scheduler, inspector = async_engine.engine.scheduler, async_engine.inspector
        schedule, step, update = scheduler.schedule, async_engine._step, inspector.update
        scheduled = [0]

        def timed_schedule() -> Any:
            output = schedule()
            scheduled[0] = output.num_scheduled_tokens
            return output

        def timed_step() -> None:
            start = time.perf_counter()
            step()
            self.steps.append((self.phase, time.perf_counter() - start, scheduled[0]))

        def timed_update(*args: Any, **kwargs: Any) -> None:
            before = inspector.state
            start = time.perf_counter()
            update(*args, **kwargs)
            if inspector.state is not before:
                self.copies.append((self.phase, time.perf_counter() - start))

        scheduler.schedule = timed_schedule
        async_engine._step = timed_step
        inspector.update = timed_update

    def _time_answers(self) -> None:
        from kvserve.server.inspector import routes

        build, clock = routes.state_json, self  # type: ignore[attr-defined]

        def timed_build(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            content = build(*args, **kwargs)
            clock.answers.append((clock.phase, time.perf_counter() - start))
            return content

        class TimedResponse(JSONResponse):
            def render(self, content: Any) -> bytes:
                start = time.perf_counter()
                body: bytes = super().render(content)
                clock.answers.append((clock.phase, time.perf_counter() - start))
                return body

        self._originals = {"state_json": build, "JSONResponse": JSONResponse}
        setattr(routes, "state_json", timed_build)  # noqa: B010 (the names routes.py looks up)
        setattr(routes, "JSONResponse", TimedResponse)  # noqa: B010

    def close(self) -> None:
        """Give routes.py its own functions back (the engine's are the engine's)."""
        from kvserve.server.inspector import routes

        for name, original in self._originals.items():
            setattr(routes, name, original)


def keep_busy(
    base: str,
    args: argparse.Namespace,
    vocab: tuple[int, frozenset[int]],
    seed: int,
    stop: threading.Event,
    served: threading.Event,
) -> None:
    """Send requests one after another until `stop`; no two prompts share a prefix."""
    vocab_size, exclude = vocab
    with httpx.Client(base_url=base, timeout=600) as http:
        for index in itertools.count():
            if stop.is_set():
                return
            prompt = wl.random_token_ids(args.input_len, vocab_size, f"{seed}:{index}", exclude)
            body = {"prompt": prompt, "max_tokens": args.output_len, "ignore_eos": True}
            http.post("/v1/completions", json=body).raise_for_status()
            served.set()


class Viewer:
    """What watches the inspector in the open phases: nobody ('none', the A/A run), a poller
    of /kv/state as the page polls ('poll'), or the page itself in Debian's chromium
    ('browser': the page loaded once and paused in the closed phases, so the open ones
    measure it updating, not loading)."""

    def __init__(self, base: str, kind: str) -> None:
        self.base, self.kind = base, kind
        self.page: Any = None

    def __enter__(self) -> Viewer:
        if self.kind == "browser":
            self._launch()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.page is not None:
            self._playwright.__exit__(*exc)

    def watch(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        if self.kind == "none":
            time.sleep(seconds)
        elif self.kind == "browser":
            self._press_pause()  # resume
            self.page.wait_for_timeout(1000 * max(0.0, end - time.monotonic()))
        else:
            self._poll(end)

    def close(self) -> None:
        if self.page is not None:
            self._press_pause()

    def _press_pause(self) -> None:
        """The page's pause button: paused, it keeps its picture and polls nothing."""
        self.page.locator("#pause").click()

    def _poll(self, end: float) -> None:
        since: dict[str, float] = {}  # the page asks only for the series' new points
        with httpx.Client(base_url=self.base, timeout=60) as http:
            while time.monotonic() < end:
                reply = http.get("/kv/state", params=since)
                reply.raise_for_status()
                points = reply.json()["series"]
                if points:
                    since = {"since": points[-1]["t"]}
                time.sleep(POLL_S)

    def _launch(self) -> None:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as error:
            raise ValueError("viewer: 'browser' needs playwright (pip install '.[dev]')") from error
        chromium = shutil.which("chromium")
        if chromium is None:
            raise ValueError("viewer: 'browser' needs Debian's chromium (make chromium)")
        self._playwright = sync_playwright()
        playwright = self._playwright.__enter__()
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.goto(self.base + "/kv")  # loaded once, then paused while closed
        self.page.wait_for_selector("#grid .blk")
        self._press_pause()


class ServerThread:
    """The app under uvicorn on a free loopback port, on a thread of this process."""

    def __init__(self, async_engine: Any) -> None:
        self.async_engine = async_engine

    def __enter__(self) -> str:
        import uvicorn

        from kvserve.server.api_server import build_app
        from kvserve.server.launch import uvicorn_config
        from kvserve.server.limits import ServerLimits

        limits = ServerLimits()
        app = build_app(self.async_engine, "bench", None, limits)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits))
        kwargs = {"sockets": [self.sock]}
        self.thread = threading.Thread(target=self.server.run, kwargs=kwargs, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
        self.async_engine.shutdown()
