"""`kvserve trace simulate FILE`: hit ratio against capacity per eviction policy (and tiers)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from typing import Any

from kvserve.kv.eviction import EVICTION_POLICIES
from kvserve.trace.records import TRACE_BLOCK_TOKENS, TraceReader, TraceRecord


def add_parser(sub: Any) -> None:
    """`simulate` under the `trace` command's subparsers (built in kvserve/cli/main.py)."""
    p = sub.add_parser(
        "simulate",
        help="replay a trace through the engine's block pool: hit ratio per policy and capacity",
    )
    p.add_argument("file", help="a .jsonl trace")
    p.add_argument(
        "--capacity-blocks",
        required=True,
        help="comma-separated cache sizes in trace blocks; 'unbounded' for no limit",
    )
    p.add_argument("--policy", default="lru", help=f"comma-separated, of {EVICTION_POLICIES}")
    p.add_argument("--prefill-tokens-per-s", type=float, default=10_000.0, help="measured")
    p.add_argument("--decode-ms-per-token", type=float, default=30.0, help="time per output token")
    p.add_argument(
        "--kv-bytes-per-token", type=int, default=131_072, help="from `kvserve kv-size` (tiers)"
    )
    p.add_argument(
        "--tiers",
        default=None,
        help="lower tiers below the pool, name:capacity_blocks:GB_per_s,... "
        "(e.g. cpu:20000:25,disk:200000:3)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--output-json", default=None, help="also write the results here")
    p.add_argument("--plot", default=None, help="write the hit-ratio-vs-capacity PNG here")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count them")
    p.set_defaults(func=run)


def parse_capacities(text: str) -> list[int | None]:
    """'1000,5000,unbounded' -> [1000, 5000, None].

    Raises:
        ValueError: an entry is not a positive integer or 'unbounded' (names --capacity-blocks).
    """
    capacities: list[int | None] = []
    for entry in text.split(","):
        entry = entry.strip().replace("_", "")
        if entry == "unbounded":
            capacities.append(None)
            continue
        if not entry.isdigit() or int(entry) < 1:
            message = "each entry is a positive integer or 'unbounded'"
            raise ValueError(f"--capacity-blocks: {message}, got {entry!r}")
        capacities.append(int(entry))
    return capacities


def parse_policies(text: str) -> list[str]:
    policies = [p.strip() for p in text.split(",")]
    for policy in policies:
        if policy not in EVICTION_POLICIES:
            raise ValueError(f"--policy: must be among {EVICTION_POLICIES}, got {policy!r}")
    return policies


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvserve.sim.replay import simulate
    from kvserve.sim.results import CostModel
    from kvserve.sim.tiers import parse_tiers

    capacities = parse_capacities(args.capacity_blocks)
    policies = parse_policies(args.policy)
    tiers = parse_tiers(args.tiers) if args.tiers else None
    cost = CostModel(args.prefill_tokens_per_s, args.decode_ms_per_token, args.kv_bytes_per_token)
    reader = TraceReader(args.file, skip_bad_lines=args.skip_bad_lines)

    def progress(records: Iterable[TraceRecord], label: str) -> Iterable[TraceRecord]:
        bar: Iterable[TraceRecord] = tqdm(
            records, desc=label, unit=" req", disable=None, leave=False
        )
        return bar

    results = simulate(lambda: iter(reader), capacities, policies, cost, tiers, progress)
    report: dict[str, Any] = {
        "file": args.file,
        "num_skipped_lines": reader.num_skipped,
        "first_skipped": reader.first_errors,
        "cost_model": {
            "prefill_tokens_per_s": cost.prefill_tokens_per_s,
            "decode_ms_per_token": cost.decode_ms_per_token,
            "kv_bytes_per_token": cost.kv_bytes_per_token,
            "block_tokens": TRACE_BLOCK_TOKENS,
        },
        "tiers": [t._asdict() for t in tiers or []],
        "results": results,
        "curves": {
            policy: [
                [r["capacity_blocks"], r["block_hit_ratio"], r["token_hit_ratio"]]
                for r in results
                if r["policy"] == policy
            ]
            for policy in policies
        },
    }
    if args.plot:
        from kvserve.sim.plots import plot_hit_ratio

        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot_hit_ratio(results, args.plot, title=os.path.basename(args.file))
        report["plot"] = args.plot
    text = json.dumps(report, indent=2, allow_nan=False)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as file:
            file.write(text + "\n")
    if args.json:
        print(text)
    else:
        print_table(report)
    return 0


def print_table(report: dict[str, Any]) -> None:
    results = report["results"]
    print(f"{report['file']}: {results[0]['num_requests']:,} requests, "
          f"{report['num_skipped_lines']} lines skipped")  # fmt: skip
    tier_names = [t["name"] for t in report["tiers"]]
    header = (
        f"{'policy':<7} {'capacity':>10} {'block hit':>9} {'token hit':>9} "
        f"{'evictions':>10} {'rejected':>8} {'queue s':>8} {'prefill saved':>13}"
    )
    print(header + "".join(f" {name + ' hits':>12}" for name in tier_names))
    for r in results:
        capacity = "unbounded" if r["unbounded"] else f"{r['capacity_blocks']:,}"
        line = (
            f"{r['policy']:<7} {capacity:>10} {100 * r['block_hit_ratio']:>8.1f}% "
            f"{100 * r['token_hit_ratio']:>8.1f}% {r['evictions']:>10,} {r['num_rejected']:>8,} "
            f"{r['mean_queue_wait_s']:>8.2f} {100 * r['prefill_saved_fraction']:>12.1f}%"
        )
        print(line + "".join(f" {r['tiers'][n]['hit_blocks']:>12,}" for n in tier_names))
