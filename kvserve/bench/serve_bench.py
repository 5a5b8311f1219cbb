"""`kvserve bench serve`: an async client that replays a workload against an OpenAI server.

Each request is a streamed `/v1/completions` call with a token-id prompt, greedy,
`ignore_eos` (so it produces exactly `max_tokens`) and `stream_options.include_usage`.
Every request is sent at its arrival time whether or not earlier ones have finished
(open loop, like vLLM's `benchmark_serving`); `--max-concurrency` caps requests in flight.

    request:   sent -------- ttft --------> chunk 1 -- itl --> chunk 2 ... chunk n = done
    tpot = (e2el - ttft) / (output_tokens - 1);   goodput = requests/s meeting every SLO

The server is either running already (`--base-url`) or started by the bench, once per
`--launch "SERVER ARGS"` (repeatable; `--launch "cluster ARGS"` starts `kvserve cluster`):
the same workload then runs against each configuration in turn, and the table gives each
run's metrics and its ratio to the first.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import shlex
from pathlib import Path
from typing import Any

import httpx

from kvserve.bench import serve_report
from kvserve.bench import serve_workload as sw
from kvserve.bench.serve_client import run_workload
from kvserve.bench.server_process import ServerProcess
from kvserve.trace.records import TraceReader


def add_subcommand(commands: Any) -> None:
    serve = commands.add_parser("serve", help="replay a workload against an OpenAI server")
    target = serve.add_argument_group("server")
    target.add_argument("--base-url", default=None, help="a running server (default: --launch)")
    target.add_argument(
        "--launch", action="append", default=None, metavar="ARGS",
        help="start `kvserve serve ARGS` for a run (repeatable: one run per ARGS; '' = "
        "defaults); ARGS starting with `cluster` start `kvserve cluster` with the rest",
    )  # fmt: skip
    target.add_argument("--launch-timeout", type=float, default=900.0, help="s to start one")
    target.add_argument("--model", default=None, help="model name to send (default: the served)")
    target.add_argument("--vocab-size", type=int, default=None,
                        help="random token ids below this (default: the default model's tokenizer"
                             " without special tokens)")  # fmt: skip
    work = serve.add_argument_group("workload (random unless --trace)")
    work.add_argument("--num-prompts", type=int, default=100)
    work.add_argument("--input-len", type=int, default=128)
    work.add_argument("--output-len", type=int, default=64)
    work.add_argument("--request-rate", type=float, default=math.inf, help="Poisson req/s")
    work.add_argument(
        "--num-long-prompts",
        type=int,
        default=0,
        help="also send long prompts (tag 'long') among the random requests",
    )
    work.add_argument("--long-input-len", type=int, default=2048)
    work.add_argument("--long-output-len", type=int, default=1)
    work.add_argument("--long-prompt-start", type=float, default=2.0, help="s, first long one")
    work.add_argument("--long-prompt-interval", type=float, default=4.0, help="s between them")
    work.add_argument("--trace", default=None, help="Mooncake JSONL trace to replay")
    work.add_argument(
        "--scale",
        type=float,
        default=1 / 32,
        help="trace: multiply lengths and arrival times by this (default 1/32)",
    )
    work.add_argument("--time-scale", type=float, default=None, help="trace: overrides --scale")
    work.add_argument("--length-scale", type=float, default=None, help="trace: overrides --scale")
    work.add_argument("--max-requests", type=int, default=None, help="trace: the first N")
    work.add_argument("--skip-bad-lines", action="store_true", help="trace: skip and count")
    work.add_argument("--seed", type=int, default=0)
    out = serve.add_argument_group("measurement")
    out.add_argument("--max-concurrency", type=int, default=None)
    out.add_argument("--slo-ttft-ms", type=float, default=None)
    out.add_argument("--slo-tpot-ms", type=float, default=None)
    out.add_argument("--warmup-requests", type=int, default=2, help="untimed, before each run")
    out.add_argument("--output-json", default=None)
    out.add_argument("--plot", default=None, help="PNG: TTFT and ITL distributions per run")
    out.add_argument("--label", action="append", default=None, help="a name per run")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--wait-idle", type=float, default=0.0, help="max s to wait for idle")


def main(args: argparse.Namespace, monitor: Any) -> dict[str, Any]:
    """Run the workload once per server configuration; the JSON record's `results`."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if (args.base_url is None) == (args.launch is None):
        raise ValueError("base_url / launch: give exactly one (a running server, or ARGS)")
    labels = args.label or (args.launch if args.launch is not None else [args.base_url])
    runs_args: list[str | None] = list(args.launch) if args.launch is not None else [None]
    if len(labels) != len(runs_args):
        raise ValueError(f"label: {len(labels)} labels for {len(runs_args)} runs")
    space = _token_space(args)
    requests, workload = build_workload(args, space, _max_model_len_hint(args))  # one for all
    runs = []
    for index, (label, launch) in enumerate(zip(labels, runs_args, strict=True)):
        sample = monitor.wait_idle(args.wait_idle)
        run = _one_run(args, launch, index, requests, space)
        run.update(label=label, server_args=launch, workload=workload)
        run["load_before"] = sample._asdict()
        runs.append(run)
        serve_report.print_run(label, run["metrics"])
    if len(runs) > 1:
        serve_report.print_comparison(runs)
    if args.plot:
        serve_report.plot_runs(runs, args.plot)
        print(f"wrote {args.plot}")
    for run in runs:
        run.pop("results_raw")
    return {"runs": runs}


def build_workload(
    args: argparse.Namespace, space: sw.TokenSpace, max_model_len: int | None
) -> tuple[list[sw.BenchRequest], dict[str, Any]]:
    """The requests and a description of them for the record."""
    if args.trace is not None:
        time_scale = args.time_scale if args.time_scale is not None else args.scale
        length_scale = args.length_scale if args.length_scale is not None else args.scale
        replay = sw.TraceReplay(space, time_scale, length_scale, max_model_len, args.seed)
        reader = TraceReader(args.trace, skip_bad_lines=args.skip_bad_lines)
        requests = list(replay.requests(reader, args.max_requests))
        if not requests:
            raise ValueError(f"trace: no request of {args.trace} fits max_model_len")
        info = {
            "kind": "trace", "trace": Path(args.trace).name, "time_scale": time_scale,
            "length_scale": length_scale, "block_tokens": replay.block_tokens,
            "num_requests": len(requests), "dropped_too_long": replay.num_too_long,
            "skipped_bad_lines": reader.num_skipped,
            "span_s": requests[-1].arrival_s,
        }  # fmt: skip
        return requests, info
    requests = sw.random_requests(
        args.num_prompts, args.input_len, args.output_len, args.request_rate, space, args.seed
    )
    requests += sw.long_prompt_requests(
        args.num_long_prompts, args.long_input_len, args.long_output_len,
        args.long_prompt_start, args.long_prompt_interval, space, args.seed,
    )  # fmt: skip
    requests.sort(key=lambda r: r.arrival_s)
    info = {
        "kind": "random", "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "num_long_prompts": args.num_long_prompts, "long_input_len": args.long_input_len,
    }  # fmt: skip
    return requests, info


def _one_run(
    args: argparse.Namespace,
    launch: str | None,
    index: int,
    requests: list[sw.BenchRequest],
    space: sw.TokenSpace,
) -> dict[str, Any]:
    """One run against a running server, or against a server started for it (its output
    goes to `<output-json stem>.server<index>.log`)."""
    if launch is None:
        return _measure(args, args.base_url, requests, space)
    log = Path(args.output_json or "bench_serve").with_suffix(f".server{index}.log")
    words = shlex.split(launch)
    command = words.pop(0) if words[:1] == ["cluster"] else "serve"
    with ServerProcess(words, log, args.launch_timeout, command) as server:
        return _measure(args, server.base_url, requests, space)


def _measure(
    args: argparse.Namespace,
    base_url: str,
    requests: list[sw.BenchRequest],
    space: sw.TokenSpace,
) -> dict[str, Any]:
    base_url = base_url.rstrip("/")
    card = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]
    model = args.model or card["id"]
    max_len = card.get("max_model_len")
    if max_len is not None:
        too_long = [r for r in requests if len(r.prompt_token_ids) + r.max_tokens > max_len]
        if too_long:
            raise ValueError(
                f"max_model_len: {len(too_long)} requests exceed the server's {max_len} tokens"
            )
    if args.warmup_requests:
        warm = sw.random_requests(args.warmup_requests, 16, 4, math.inf, space, -1, "warmup")
        asyncio.run(run_workload(base_url, model, warm))
    results, duration = asyncio.run(
        run_workload(base_url, model, requests, args.max_concurrency, not args.no_progress)
    )
    metrics = serve_report.compute_metrics(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    server_metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {
        "base_url": base_url,
        "model": model,
        "metrics": metrics,
        "server_prefix_cache": _prefix_cache_counters(server_metrics),
        "server_kv_transfer": _counters(server_metrics, _TRANSFER_COUNTERS),
        "results_raw": results,
        "ttfts_ms": [r.ttft_s * 1e3 for r in results if r.ok],
        "itls_ms": {
            tag: [g * 1e3 for r in results if r.ok and r.tag == tag for g in r.itls_s]
            for tag in sorted({r.tag for r in results})
        },  # fmt: skip
    }


def _prefix_cache_counters(text: str) -> dict[str, float]:
    """kvserve:prefix_cache_queries/hits totals from the Prometheus text."""
    return _counters(text, ("prefix_cache_queries", "prefix_cache_hits"))


# `kvserve cluster` with prefill/decode disaggregation: what the handoffs moved (cluster/)
_TRANSFER_COUNTERS = tuple(
    f"kv_transfer_{name}" for name in ("requests", "blocks", "bytes", "seconds")
)


def _counters(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The `kvserve:<name>_total` counters of the Prometheus text that are there."""
    counters = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(f"kvserve:{name}_total"):
                counters[name] = float(line.rsplit(" ", 1)[1])
    return counters


def _token_space(args: argparse.Namespace) -> sw.TokenSpace:
    if args.vocab_size is not None:
        if args.vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {args.vocab_size}")
        return sw.TokenSpace(args.vocab_size)
    from kvserve.default_model import default_gguf_path
    from kvserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_gguf_path())
    assert tokenizer is not None
    return sw.TokenSpace(len(tokenizer), frozenset(tokenizer.all_special_ids))


def _max_model_len_hint(args: argparse.Namespace) -> int | None:
    """The longest request a trace replay keeps: read from a running server, else the
    `--max-model-len` in the launch args, else kvserve's default cap."""
    if args.base_url is not None:
        card = httpx.get(f"{args.base_url.rstrip('/')}/v1/models", timeout=30).json()["data"][0]
        max_len = card.get("max_model_len")
        return int(max_len) if max_len is not None else None
    lens = []
    for launch in args.launch:
        words = shlex.split(launch)
        if "--max-model-len" in words:
            lens.append(int(words[words.index("--max-model-len") + 1]))
    from kvserve.engine.engine_config import DEFAULT_MAX_MODEL_LEN

    return min(lens) if lens else DEFAULT_MAX_MODEL_LEN
