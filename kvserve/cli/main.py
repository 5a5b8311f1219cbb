"""The `kvserve` parser: one subcommand per job, each module adding its own flags."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from kvserve.bench import cli as bench_cli
from kvserve.cli import cluster, generate, kernels, kv_size, serve
from kvserve.eval import cli as eval_cli
from kvserve.sim import cli as sim_cli
from kvserve.trace import cli as trace_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvserve",
        description="kvserve command line: generate | chat | serve | cluster | kv-size | kernels | "
        "eval | trace | bench. Engine flags are generated from the fields of EngineConfig (vLLM "
        "spelling), so every engine argument is a flag everywhere an engine is built.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    commands = parser.add_subparsers(dest="command", required=True)
    generate.add_subcommands(commands)
    serve.add_subcommand(commands)
    cluster.add_subcommand(commands)
    kv_size.add_subcommand(commands)
    kernels.add_subcommand(commands)
    eval_cli.add_subcommand(commands)
    _add_trace(commands)
    _add_bench(commands)
    return parser


def _add_trace(commands: Any) -> None:
    """`kvserve trace stats` (kvserve/trace) and `kvserve trace simulate` (kvserve/sim)."""
    trace = commands.add_parser("trace", help="analyze request traces (Mooncake format)")
    sub = trace.add_subparsers(dest="trace_command", required=True)
    trace_cli.add_parser(sub)
    sim_cli.add_parser(sub)


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmarks (latency, throughput, prefix, memory, serve, kv-dtype, tiers, "
        "trace-tiers)",
    )
    bench_cli.add_subcommands(bench)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
