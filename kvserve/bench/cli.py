"""`kvserve bench latency | throughput | prefix | memory | serve | kv-dtype | tiers |
trace-tiers | inspector`: the subcommands, and one JSON record per run (`--output-json`)."""

from __future__ import annotations

import argparse
import datetime

from kvserve.bench import (
    cache_bench,
    inspector_bench,
    kv_dtype_bench,
    offline,
    serve_bench,
    tier_bench,
    trace_tiers,
)
from kvserve.bench.record import Record, machine_info, write_record
from kvserve.config import EngineConfig
from kvserve.utils.load_monitor import LoadMonitor


def add_subcommands(bench_parser: argparse.ArgumentParser) -> None:
    """Every benchmark under `kvserve bench`, the engine ones with every engine flag."""
    commands = bench_parser.add_subparsers(dest="bench_command", required=True)
    lat = commands.add_parser("latency", help="batch-1 decode speed and the no-cache baseline")
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=256)
    lat.add_argument("--num-iters", type=int, default=3)
    lat.add_argument("--warmup", type=int, default=1, help="untimed runs before measuring")
    lat.add_argument("--no-cache-lens", default="128,512,1024", help="prompt lengths; '' skips")
    lat.add_argument("--no-cache-output-len", type=int, default=32)
    lat.add_argument("--no-cache-iters", type=int, default=1)
    lat.add_argument("--plot", default=None, help="PNG of tok/s vs prompt length, cache vs none")
    thr = commands.add_parser("throughput", help="many random prompts at once (--seed fixes them)")
    thr.add_argument("--num-prompts", type=int, default=64)
    thr.add_argument("--min-input-len", type=int, default=32)
    thr.add_argument("--max-input-len", type=int, default=512)
    thr.add_argument("--output-len", type=int, default=128)
    thr.add_argument("--num-iters", type=int, default=3)
    thr.add_argument("--warmup", type=int, default=1, help="small untimed batches first")
    thr.add_argument("--hf-batch-size", type=int, default=16)
    thr.add_argument("--hf-num-iters", type=int, default=1, help="transformers iterations")
    for parser in (lat, thr):
        parser.add_argument("--compare-transformers", action="store_true")
        parser.add_argument("--output-json", default=None, help="write the run's JSON record")
        parser.add_argument("--wait-idle", type=float, default=0.0, help="max s to wait for idle")
        EngineConfig.add_cli_args(parser)
    cache_bench.add_subcommands(commands)
    serve_bench.add_subcommand(commands)
    kv_dtype_bench.add_subcommand(commands)
    tier_bench.add_subcommand(commands)
    trace_tiers.add_subcommand(commands)
    inspector_bench.add_subcommand(commands)
    bench_parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    monitor = LoadMonitor()  # first, so it can tell our own load from others'
    runs = {
        "latency": offline.run_latency,
        "throughput": offline.run_throughput,
        "prefix": cache_bench.run_prefix,
        "memory": cache_bench.run_memory,
        "serve": serve_bench.main,
        "kv-dtype": kv_dtype_bench.run,
        "tiers": tier_bench.run,
        "trace-tiers": trace_tiers.run,
        "inspector": inspector_bench.run,
    }
    record: Record = runs[args.bench_command](args, monitor)
    if "benchmark" not in record:  # prefix, memory, serve, tiers, ...: results only
        record = {
            "benchmark": args.bench_command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {k: v for k, v in vars(args).items() if not callable(v)},
            "machine": machine_info(),
            "results": record,
        }
    if args.output_json:
        write_record(record, args.output_json)
        print(f"wrote {args.output_json}")
    return 0
