"""`kvserve trace stats FILE`: arrivals, lengths, reuse, lifetimes and skew of a trace.

The `trace` command itself is built in kvserve/cli/main.py, which adds this parser and
`trace simulate` (kvserve/sim/cli.py) under it; kvserve/trace imports neither.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from kvserve.trace.records import TraceReader
from kvserve.trace.stats import collect, summarize


def add_parser(sub: Any) -> None:
    """`stats` under the `trace` command's subparsers."""
    stats = sub.add_parser("stats", help="arrivals, lengths, reuse, lifetimes, skew")
    stats.add_argument("file", help="a .jsonl trace")
    stats.add_argument("--json", action="store_true", help="print the summary as JSON")
    stats.add_argument("--plot-dir", default=None, help="write PNG plots here")
    stats.add_argument("--skip-bad-lines", action="store_true", help="skip and count them")
    stats.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    reader = TraceReader(args.file, skip_bad_lines=args.skip_bad_lines)
    records = tqdm(reader, desc="reading trace", unit=" req", disable=None, leave=False)
    stats = collect(records)
    summary = summarize(stats)
    summary["file"] = args.file
    summary["num_skipped_lines"] = reader.num_skipped
    summary["first_skipped"] = reader.first_errors
    if args.plot_dir:
        from kvserve.trace.plots import plot_stats

        os.makedirs(args.plot_dir, exist_ok=True)
        summary["plots"] = plot_stats(stats, args.plot_dir)
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False))
    else:
        print_summary(summary)
    return 0


def print_summary(s: dict[str, Any]) -> None:
    def dist(name: str, key: str, unit: str = "") -> None:
        d = s[key]
        if d["count"] == 0:
            print(f"  {name:<30} -")
            return
        print(
            f"  {name:<30} mean {d['mean']:,.1f}{unit}  p50 {d['p50']:,.1f}{unit}  "
            f"p90 {d['p90']:,.1f}{unit}  p99 {d['p99']:,.1f}{unit}  max {d['max']:,.1f}{unit}"
        )

    rate = s["mean_rate_rps"] or 0.0
    print(f"{s['file']}: {s['num_requests']:,} requests over {s['duration_s']:,.0f} s "
          f"({rate:.2f} req/s); {s['num_skipped_lines']} lines skipped")  # fmt: skip
    dist("arrivals per second (1 min bins)", "rate_per_minute")
    dist("input length, tokens", "input_length")
    dist("output length, tokens", "output_length")
    print(f"  prompt blocks: {s['num_prompt_blocks']:,} ({s['num_distinct_blocks']:,} distinct)")
    print(f"  unbounded-cache hit ratio: {100 * s['block_hit_ratio']:.1f}% of blocks, "
          f"{100 * s['token_hit_ratio']:.1f}% of prompt tokens")  # fmt: skip
    dist("reuse distance, blocks", "reuse_distance_blocks")
    dist("reuse interval", "reuse_interval_s", " s")
    dist("lifetime of reused blocks", "reused_block_lifetime_s", " s")
    dead = s["reused_blocks_dead_within_10_min"]
    if dead is not None:
        print(f"  reused blocks whose last use is within 10 min of their first: {100 * dead:.1f}%")
    if s["hit_share_top_1pct_blocks"] is not None:
        print(f"  hits taken by the top 1% / 10% of blocks: "
              f"{100 * s['hit_share_top_1pct_blocks']:.1f}% / "
              f"{100 * s['hit_share_top_10pct_blocks']:.1f}%")  # fmt: skip
