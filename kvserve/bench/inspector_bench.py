"""`kvserve bench inspector`: the engine's step time with the KV inspector watched vs not,
in one run on one server.

A server (this process: uvicorn on a thread, the engine on its own, as `kvserve serve` runs)
serves a steady load: `--concurrency` clients each sending random prompts of `--input-len`
tokens for `--output-len` tokens, one after another. Phases of `--phase-s` seconds alternate
"closed" (nobody watches: the inspector copies nothing) and "open" (a viewer polls /kv/state
every 0.4 s as the page does, asking for the series' new points only; `--viewer browser`
opens the real page in Debian's chromium, whose drawing then shares the machine's cores).
A view keeps the copies coming for WATCH_S after it, so each closed phase starts after a
settle gap the clock does not count.

Per phase: the engine loop's time per step (model step + outputs + the inspector's update and
copy) and per scheduled token, and the time spent copying the cache. Step times depend on the
batch (a prefill chunk costs many decodes), so the headline ratio compares like with like:
decode-only steps of the same batch size, open vs closed, within each (closed, open) pair of
adjacent phases (the machine's speed drifts over a run), then the geometric mean over pairs.
`--viewer none` runs the same phases with nobody watching: the A/A run, the noise floor.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import socket
import statistics
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx

from kvserve.bench import workloads as wl
from kvserve.bench.record import Record
from kvserve.config import EngineConfig
from kvserve.server.inspector.publisher import WATCH_S
from kvserve.utils.load_monitor import LoadMonitor

POLL_S = 0.4  # the page's poll interval (static/kv.js)


def add_subcommand(commands: Any) -> None:
    parser = commands.add_parser("inspector", help="step time with the KV inspector open vs not")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--num-phases", type=int, default=6, help="closed, open, closed, ...")
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument(
        "--viewer",
        choices=["poll", "browser", "none"],
        default="poll",
        help="what watches in open phases ('none': nobody, the A/A run that shows the noise)",
    )
    parser.add_argument("--output-json", default=None, help="write the run's JSON record")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="max s to wait for idle")
    EngineConfig.add_cli_args(parser)


class StepClock:
    """Times every engine loop step (`AsyncEngine._step`) and the inspector's updates."""

    def __init__(self, async_engine: Any) -> None:
        self.phase = -1  # the phase's index; -1 outside the phases
        self.steps: list[tuple[int, float, int]] = []  # (phase, seconds, scheduled tokens)
        self.copies: list[tuple[int, float]] = []
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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    logging.getLogger("kvserve.server").setLevel(logging.WARNING)
    config = EngineConfig.from_cli_args(args)
    async_engine = AsyncEngine.build(lambda: Engine(config))
    clock = StepClock(async_engine)
    engine = async_engine.engine
    vocab = wl.token_space(SimpleNamespace(engine=engine, tokenizer=engine.tokenizer))
    with _server(async_engine) as base:
        stop, served = threading.Event(), threading.Event()
        clients = [
            threading.Thread(
                target=_client, args=(base, args, vocab, seed, stop, served), daemon=True
            )
            for seed in range(args.concurrency)
        ]
        for client in clients:
            client.start()
        if not served.wait(timeout=900):  # the first answer: kernels built and loaded
            raise RuntimeError("the server answered no request in 900 s")
        time.sleep(args.warmup_s)
        for index in range(args.num_phases):
            if index and _kind(index) == "closed":
                clock.phase = -1  # the last view keeps copies coming for WATCH_S
                time.sleep(WATCH_S + 1.0)
            clock.phase = index
            print(f"phase {index + 1}/{args.num_phases}: {_kind(index)}", flush=True)
            if _kind(index) == "open":
                _watch(base, args.viewer, args.phase_s)
            else:
                time.sleep(args.phase_s)
        clock.phase = -1
        stop.set()
        for client in clients:
            client.join(timeout=600)
    return _results(clock, args.concurrency)


def _results(clock: StepClock, concurrency: int) -> Record:
    """Per phase kind: steps, step times, copies; the open/closed ratios; and the decode
    ratio of each (closed, open) pair of phases (their spread shows the machine's noise) and
    its geometric mean, the headline."""
    rows: Record = {}
    for kind in ("closed", "open"):
        steps = [(s, n) for p, s, n in clock.steps if _kind(p) == kind]
        copies = [c for p, c in clock.copies if _kind(p) == kind]
        seconds = [s for s, _ in steps]
        rows[kind] = {
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
    num_pairs = 1 + max(p for p, _, _ in clock.steps) // 2
    by_pair = [_decode_ratio(clock.steps, concurrency, _in_pair(pair)) for pair in range(num_pairs)]
    rows["decode_step_ratio_by_pair"] = by_pair
    # pair by pair, then the geometric mean: the machine's speed drifts over a run, and
    # pooling phases run at different speeds would mix that drift into the ratio
    found = [r for r in by_pair if r is not None]
    rows["decode_step_ratio"] = statistics.geometric_mean(found) if found else None
    for name in ("closed", "open"):
        row = rows[name]
        print(
            f"{name:6s}: {row['num_steps']} steps, mean {row['mean_step_ms']:.2f} ms, median "
            f"{row['median_step_ms']:.2f} ms, {row['ms_per_token']:.3f} ms/token, "
            f"{row['num_copies']} copies of {row['mean_copy_ms']:.2f} ms "
            f"({100 * row['copy_share']:.2f}% of step time)"
        )
    pairs = ", ".join(f"{r:.3f}x" for r in rows["decode_step_ratio_by_pair"] if r is not None)
    print(
        f"open / closed: decode steps of equal batch {rows['decode_step_ratio'] or 0:.3f}x "
        f"(by pair of phases: {pairs}); all steps: mean {rows['mean_step_ms_ratio']:.3f}x, "
        f"median {rows['median_step_ms_ratio']:.3f}x, per token {rows['ms_per_token_ratio']:.3f}x"
    )
    return rows


def _in_pair(pair: int) -> Callable[[int], bool]:
    return lambda phase: phase >= 0 and phase // 2 == pair


def _kind(phase: int) -> str | None:
    """Phases alternate closed (even), open (odd); -1 is warmup, settle or done."""
    return None if phase < 0 else ("open" if phase % 2 else "closed")


def _decode_ratio(
    steps: list[tuple[int, float, int]], concurrency: int, keep: Callable[[int], bool]
) -> float | None:
    """Open/closed median step time over the decode-only steps (at most `concurrency` tokens:
    one per running request) of the phases `keep` accepts, batch size by batch size,
    weighted by the smaller count."""
    by_batch: dict[tuple[str | None, int], list[float]] = {}
    for phase, seconds, tokens in steps:
        if keep(phase) and 0 < tokens <= concurrency:
            by_batch.setdefault((_kind(phase), tokens), []).append(seconds)
    total = weight = 0.0
    for tokens in range(1, concurrency + 1):
        closed, opened = by_batch.get(("closed", tokens)), by_batch.get(("open", tokens))
        if closed and opened:
            count = min(len(closed), len(opened))
            total += count * statistics.median(opened) / statistics.median(closed)
            weight += count
    return total / weight if weight else None


def _client(
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


def _watch(base: str, viewer: str, seconds: float) -> None:
    """Watch the inspector for `seconds`: poll its JSON as the page does, or open the page."""
    end = time.monotonic() + seconds
    if viewer == "none":
        time.sleep(seconds)
        return
    if viewer == "poll":
        since: dict[str, float] = {}  # the page asks only for the series' new points
        with httpx.Client(base_url=base, timeout=60) as http:
            while time.monotonic() < end:
                reply = http.get("/kv/state", params=since)
                reply.raise_for_status()
                points = reply.json()["series"]
                if points:
                    since = {"since": points[-1]["t"]}
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
