"""What every process of scripts/gguf_bench.py shares: the workloads and their timing.
Standard library only: the llama.cpp child imports it from its own venv.

A system's child turns its engine into a `stream(prompt_ids, num_tokens)` that yields greedy token
ids as they are decoded; `run_spec` times every workload through it the same way:

    start ---- ttft ----> token 1 ---- decode (n - 1 tokens) ----> token n
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

Stream = Callable[[list[int], int], Iterator[int]]  # (prompt_ids, num_tokens) -> token ids


class Workload(NamedTuple):
    name: str
    prompt_len: int
    output_len: int


WORKLOADS = (
    Workload("decode 128+256", 128, 256),
    Workload("decode 1024+128", 1024, 128),
    Workload("prefill 512", 512, 1),
    Workload("prefill 2048", 2048, 1),
)
CONTEXT_LEN = 2304  # the longest workload plus room: both systems size their KV cache to it


def time_generation(stream: Stream, prompt_ids: list[int], num_tokens: int) -> dict[str, float]:
    """Run one greedy generation and time it: TTFT, prompt and decode tokens per second."""
    start = time.perf_counter()
    token_times = [time.perf_counter() for _ in stream(prompt_ids, num_tokens)]
    if len(token_times) != num_tokens:
        raise RuntimeError(f"asked for {num_tokens} tokens, got {len(token_times)}")
    ttft_s = token_times[0] - start
    timing = {"ttft_ms": 1000 * ttft_s, "prefill_tok_s": len(prompt_ids) / ttft_s}
    if num_tokens > 1:
        timing["decode_tok_s"] = (num_tokens - 1) / (token_times[-1] - token_times[0])
    return timing


def run_spec(stream: Stream, spec: dict[str, Any]) -> dict[str, Any]:
    """Every workload of `spec` (warm-up once, then median of its prompts), the greedy ids of
    the check prompt, and this process's peak RSS."""
    workloads: dict[str, dict[str, float]] = {}
    for workload in spec["workloads"]:
        list(stream(workload["warmup_ids"], workload["output_len"]))
        runs = [time_generation(stream, ids, workload["output_len"]) for ids in workload["runs"]]
        workloads[workload["name"]] = {
            f"median_{key}": statistics.median(run[key] for run in runs) for key in runs[0]
        }
    greedy_ids = list(stream(spec["check_prompt_ids"], spec["check_len"]))
    return {"workloads": workloads, "greedy_ids": greedy_ids, "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident set size: VmHWM, which starts afresh at exec (ru_maxrss
    would carry over the parent's peak, since it survives fork and exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB
