"""Serving against offline on one workload: `kvserve bench serve` (every request at t=0)
over `kvserve bench throughput`, output tokens per second, in one run.

    .venv/bin/python scripts/serve_vs_offline.py --rounds 2 --output-json serve_vs_offline.json
    .venv/bin/python scripts/serve_vs_offline.py --omp-wait-policy PASSIVE

Each round runs the two commands back to back, each in its own process, on prompts of the
same lengths (`--input-len` tokens in, exactly `--output-len` out: greedy with ignore_eos;
fresh random token ids, so the prefix cache never hits in either). The ratio is taken per
round, so a drift in the machine's load between rounds cancels out; the table gives each
round and the median ratio. `--omp-wait-policy` sets OMP_WAIT_POLICY for both (see
docs/benchmarks.md, "Serving at engine speed": libgomp's spinning decides a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engine-args", default="", help="more engine flags for both")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default=None)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    env = dict(os.environ)
    if args.omp_wait_policy is not None:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            offline = _throughput(args, index, Path(tmp) / f"offline{index}.json", env)
            served = _serve(args, index, Path(tmp) / f"serve{index}.json", env)
            rounds.append({"offline_tok_s": offline, "serve_tok_s": served,
                           "ratio": served / offline})  # fmt: skip
            print(f"round {index}: offline {offline:.2f} tok/s, serve {served:.2f} tok/s, "
                  f"ratio {served / offline:.2f}", flush=True)  # fmt: skip
    median = statistics.median(r["ratio"] for r in rounds)
    print(f"median ratio serve / offline over {len(rounds)} rounds: {median:.2f}")
    if args.output_json:
        record = {"args": vars(args), "rounds": rounds, "median_ratio": median}
        Path(args.output_json).write_text(json.dumps(record, indent=2))


def _kvserve(words: list[str], env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "kvserve", *words], check=True, env=env)


def _engine_words(args: argparse.Namespace) -> list[str]:
    return ["--num-threads", str(args.num_threads), *args.engine_args.split()]


def _throughput(args: argparse.Namespace, index: int, out: Path, env: dict[str, str]) -> float:
    """`kvserve bench throughput` on one batch of fixed-length prompts: output tok/s."""
    _kvserve(
        ["bench", "throughput", "--num-prompts", str(args.num_prompts),
         "--min-input-len", str(args.input_len), "--max-input-len", str(args.input_len),
         "--output-len", str(args.output_len), "--num-iters", "1", "--seed", str(index),
         "--output-json", str(out), *_engine_words(args)],
        env,
    )  # fmt: skip
    record: dict[str, Any] = json.loads(out.read_text())
    return float(record["results"]["kvserve"]["output_throughput"])


def _serve(args: argparse.Namespace, index: int, out: Path, env: dict[str, str]) -> float:
    """`kvserve bench serve` against a server it starts, every request at t=0: output tok/s."""
    _kvserve(
        ["bench", "serve", "--launch", " ".join(_engine_words(args)),
         "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
         "--output-len", str(args.output_len), "--request-rate", "inf",
         "--seed", str(1000 + index), "--no-progress", "--output-json", str(out)],
        env,
    )  # fmt: skip
    record: dict[str, Any] = json.loads(out.read_text())
    run = record["results"]["runs"][0]
    if run["metrics"]["failed"]:
        raise RuntimeError(f"bench serve: {run['metrics']['failed']} requests failed")
    return float(run["metrics"]["output_throughput"])


if __name__ == "__main__":
    main()
