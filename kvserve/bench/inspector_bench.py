"""`kvserve bench inspector`: the engine's step time with the KV inspector watched vs not,
in one run on one server.

A server (this process: uvicorn on a thread, the engine on its own, as `kvserve serve` runs)
serves a steady load: `--concurrency` clients each sending random prompts of `--input-len`
tokens for `--output-len` tokens, one after another. Phases of `--phase-s` seconds alternate
"closed" (nobody watches: the inspector copies nothing) and "open" (a viewer polls /kv/state
every 0.4 s as the page does, asking for the series' new points only; `--viewer browser`
opens the real page in Debian's chromium, whose drawing then shares the machine's cores).
A view keeps the copies coming for `--watch-s` after it (5 s in `kvserve serve`, 1 s here, so
phases can be short), so each closed phase starts after a settle gap the clock does not count.
Short phases, many of them: the machine's speed drifts less within a pair of phases.

Per phase: the engine loop's time per step (model step + outputs + the inspector's update and
copy) and per scheduled token; the engine thread's time copying the cache, and the event
loop's time answering /kv/state (building and encoding its JSON; it holds the GIL then), the
inspector's direct costs, exact where the step-time ratio is noisy. Step times depend on the
batch (a prefill chunk costs many decodes), so the headline ratio compares like with like:
decode-only steps of the same batch size, open vs closed, within each (closed, open) pair of
adjacent phases (the machine's speed drifts over a run), then the geometric mean over pairs.
`--viewer none` runs the same phases with nobody watching: the A/A run, the noise floor.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from kvserve.bench import workloads as wl
from kvserve.bench.inspector_harness import ServerThread, StepClock, Viewer, keep_busy
from kvserve.bench.record import Record
from kvserve.config import EngineConfig
from kvserve.utils.load_monitor import LoadMonitor


def add_subcommand(commands: Any) -> None:
    parser = commands.add_parser("inspector", help="step time with the KV inspector open vs not")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--phase-s", type=float, default=4.0)
    parser.add_argument("--num-phases", type=int, default=30, help="closed, open, closed, ...")
    parser.add_argument(
        "--watch-s", type=float, default=1.0, help="how long a view keeps copies coming"
    )
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


def run(args: argparse.Namespace, monitor: LoadMonitor) -> Record:
    from kvserve.engine.engine import Engine
    from kvserve.server.async_engine import AsyncEngine

    if args.wait_idle:
        monitor.wait_idle(args.wait_idle)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    logging.getLogger("kvserve.server").setLevel(logging.WARNING)
    config = EngineConfig.from_cli_args(args)
    async_engine = AsyncEngine.build(lambda: Engine(config))
    async_engine.inspector.watch_s = args.watch_s
    clock = StepClock(async_engine)
    try:
        _run_phases(async_engine, clock, args)
    finally:
        clock.close()
    return _results(clock, args)


def _run_phases(async_engine: Any, clock: StepClock, args: argparse.Namespace) -> None:
    engine = async_engine.engine
    vocab = wl.token_space(SimpleNamespace(engine=engine, tokenizer=engine.tokenizer))
    with ServerThread(async_engine) as base, Viewer(base, args.viewer) as viewer:
        stop, served = threading.Event(), threading.Event()
        clients = [
            threading.Thread(
                target=keep_busy, args=(base, args, vocab, seed, stop, served), daemon=True
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
                clock.phase = -1  # the last view keeps copies coming for watch_s
                viewer.close()
                time.sleep(args.watch_s + 0.5)
            clock.phase = index
            print(f"phase {index + 1}/{args.num_phases}: {_kind(index)}", flush=True)
            if _kind(index) == "open":
                viewer.watch(args.phase_s)
            else:
                time.sleep(args.phase_s)
        clock.phase = -1
        stop.set()
        for client in clients:
            client.join(timeout=600)


def _results(clock: StepClock, args: argparse.Namespace) -> Record:
    """Per phase kind: steps, step times, copies; the open/closed ratios; and the decode
    ratio of each (closed, open) pair of phases (their spread shows the machine's noise) and
    its geometric mean, the headline."""
    rows: Record = {}
    for kind in ("closed", "open"):
        steps = [(s, n) for p, s, n in clock.steps if _kind(p) == kind]
        copies = [c for p, c in clock.copies if _kind(p) == kind]
        answers = [a for p, a in clock.answers if _kind(p) == kind]
        seconds = [s for s, _ in steps]
        wall = args.phase_s * sum(1 for p in range(args.num_phases) if _kind(p) == kind)
        rows[kind] = {
            "num_steps": len(steps),
            "mean_step_ms": 1000 * statistics.fmean(seconds),
            "median_step_ms": 1000 * statistics.median(seconds),
            "ms_per_token": 1000 * sum(seconds) / max(1, sum(n for _, n in steps)),
            "num_copies": len(copies),
            "mean_copy_ms": 1000 * statistics.fmean(copies) if copies else 0.0,
            "copy_share": sum(copies) / sum(seconds),
            # the event loop's time on /kv/state, a share of the wall time: what it could
            # take from the engine thread through the GIL at most
            "answer_share": sum(answers) / wall,
        }
    closed, opened = rows["closed"], rows["open"]
    for key in ("mean_step_ms", "median_step_ms", "ms_per_token"):
        rows[f"{key}_ratio"] = opened[key] / closed[key]
    num_pairs, concurrency = (args.num_phases + 1) // 2, args.concurrency
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
            f"({100 * row['copy_share']:.2f}% of step time), answers "
            f"{100 * row['answer_share']:.2f}% of the event loop's time"
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
