"""`kvserve bench inspector`: the engine's step time with the KV inspector watched vs not,
in one run on one server.

A server (this process: uvicorn on a thread, the engine on its own, as `kvserve serve` runs)
serves a steady load: `--concurrency` clients each sending random prompts of `--input-len`
tokens for `--output-len` tokens, one after another. Phases of `--phase-s` seconds alternate
"closed" (nobody watches: the inspector copies nothing) and "open" (a viewer polls /kv/state
every 0.3 s as the page does; `--viewer browser` opens the real page in Debian's chromium,
whose drawing then shares the machine's cores). Per phase: the engine loop's time per step
(model step + outputs + the inspector's update and copy) and per scheduled token, and the
time spent copying the cache.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import threading
import time
from typing import Any

import httpx

from kvserve.bench.record import Record
from kvserve.config import EngineConfig
from kvserve.utils.load_monitor import LoadMonitor

POLL_S = 0.3  # the page's poll interval (static/kv.js)


def add_subcommand(commands: Any) -> None:
    parser = commands.add_parser("inspector", help="step time with the KV inspector open vs not")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--num-phases", type=int, default=6, help="closed, open, closed, ...")
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--viewer", choices=["poll", "browser"], default="poll")
    parser.add_argument("--output-json", default=None, help="write the run's JSON record")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="max s to wait for idle")
    EngineConfig.add_cli_args(parser)


class StepClock:
    """Times every engine loop step (`AsyncEngine._step`) and the inspector's updates."""

    def __init__(self, async_engine: Any) -> None:
        self.phase = "warmup"
        self.steps: list[tuple[str, float, int]] = []  # (phase, seconds, scheduled tokens)
        self.copies: list[tuple[str, float]] = []
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


def run(args: argparse.Namespace, monitor: LoadMonitor) -> Record:
    from kvserve.engine.engine import Engine
    from kvserve.server.async_engine import AsyncEngine

    if args.wait_idle:
        monitor.wait_idle(args.wait_idle)
    config = EngineConfig.from_cli_args(args)
    async_engine = AsyncEngine.build(lambda: Engine(config))
    clock = StepClock(async_engine)
    with _server(async_engine) as base:
        stop = threading.Event()
        clients = [
            threading.Thread(target=_client, args=(base, args, seed, stop), daemon=True)
            for seed in range(args.concurrency)
        ]
        for client in clients:
            client.start()
        time.sleep(args.warmup_s)
        for index in range(args.num_phases):
            clock.phase = "open" if index % 2 else "closed"
            print(f"phase {index + 1}/{args.num_phases}: {clock.phase}", flush=True)
            if clock.phase == "open":
                _watch(base, args.viewer, args.phase_s)
            else:
                time.sleep(args.phase_s)
        clock.phase = "done"
        stop.set()
        for client in clients:
            client.join(timeout=600)
    return _results(clock)


def _results(clock: StepClock) -> Record:
    rows: Record = {}
    for phase in ("closed", "open"):
        steps = [(s, n) for p, s, n in clock.steps if p == phase]
        copies = [c for p, c in clock.copies if p == phase]
        seconds = [s for s, _ in steps]
        rows[phase] = {
            "num_steps": len(steps),
            "mean_step_ms": 1000 * statistics.fmean(seconds),
            "median_step_ms": 1000 * statistics.median(seconds),
            "ms_per_token": 1000 * sum(seconds) / max(1, sum(n for _, n in steps)),
            "num_copies": len(copies),
            "mean_copy_ms": 1000 * statistics.fmean(copies) if copies else 0.0,
            "copy_share": sum(copies) / sum(seconds),
        }
    closed, opened = rows["closed"], rows["open"]
    for key in ("mean_step_ms", "median_step_ms", "ms_per_token"):
        rows[f"{key}_ratio"] = opened[key] / closed[key]
    for name in ("closed", "open"):
        row = rows[name]
        print(
            f"{name:6s}: {row['num_steps']} steps, mean {row['mean_step_ms']:.2f} ms, median "
            f"{row['median_step_ms']:.2f} ms, {row['ms_per_token']:.3f} ms/token, "
            f"{row['num_copies']} copies of {row['mean_copy_ms']:.2f} ms "
            f"({100 * row['copy_share']:.2f}% of step time)"
        )
    print(
        f"open / closed: mean step {rows['mean_step_ms_ratio']:.3f}x, median "
        f"{rows['median_step_ms_ratio']:.3f}x, per token {rows['ms_per_token_ratio']:.3f}x"
    )
    return rows


def _client(base: str, args: argparse.Namespace, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=600) as http:
        while not stop.is_set():
            prompt = [rng.randrange(100, 20000) for _ in range(args.input_len)]
            body = {"prompt": prompt, "max_tokens": args.output_len, "ignore_eos": True}
            http.post("/v1/completions", json=body).raise_for_status()


def _watch(base: str, viewer: str, seconds: float) -> None:
    """Watch the inspector for `seconds`: poll its JSON as the page does, or open the page."""
    end = time.monotonic() + seconds
    if viewer == "poll":
        with httpx.Client(base_url=base, timeout=60) as http:
            while time.monotonic() < end:
                http.get("/kv/state").raise_for_status()
                time.sleep(POLL_S)
        return
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise ValueError("viewer: 'browser' needs playwright (pip install '.[dev]')") from error
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        raise ValueError("viewer: 'browser' needs Debian's chromium (make chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(base + "/kv")
        page.wait_for_timeout(1000 * max(0.0, end - time.monotonic()))
        browser.close()


class _server:
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
