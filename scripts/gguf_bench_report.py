"""The arithmetic and tables of scripts/gguf_bench.py's report (pure Python, no torch).

`results["systems"]` maps a system's key to what its child returned (`workloads`: the medians
of each workload, `peak_rss_mib`, `greedy_ids`) plus `add_derived`'s fields, or to
`{"skipped": why}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from gguf_bench_common import WORKLOADS

DECODE = WORKLOADS[0].name  # the decode rate the bytes-per-token table uses


class TensorInfo(NamedTuple):
    """One GGUF tensor as stored: its type name ("Q4_1", "F32", ...), elements and bytes."""

    name: str
    type_name: str
    num_elements: int
    num_bytes: int


def first_divergence(reference: Sequence[int], got: Sequence[int]) -> int | None:
    """The first position where `got` differs from `reference`; None if they agree."""
    for position, (want, have) in enumerate(zip(reference, got, strict=False)):
        if want != have:
            return position
    return None if len(reference) == len(got) else min(len(reference), len(got))


def weight_bytes_per_token(tensors: Sequence[TensorInfo], kept_types: frozenset[str] | None) -> int:
    """Weight bytes one batch-1 decode step reads: every tensor once.

    A tensor whose type is in `kept_types` (None: every type) counts its stored bytes; any other
    is dequantized, 4 bytes per element. The token embedding counts only when no `output.weight`
    exists (tied: it is the output matrix too); untied, a step reads one row of it.
    """
    names = {tensor.name for tensor in tensors}
    total = 0
    for tensor in tensors:
        if tensor.name == "token_embd.weight" and "output.weight" in names:
            continue
        kept = kept_types is None or tensor.type_name in kept_types
        total += tensor.num_bytes if kept else 4 * tensor.num_elements
    return total


def bandwidth_fraction(bytes_per_token: int, decode_tok_s: float, bandwidth_b_s: float) -> float:
    """The share of the measured memory bandwidth a decode rate streams weights at."""
    if bandwidth_b_s <= 0:
        raise ValueError(f"bandwidth_b_s: must be > 0, got {bandwidth_b_s}")
    return bytes_per_token * decode_tok_s / bandwidth_b_s


def add_derived(
    result: dict[str, Any],
    tensors: Sequence[TensorInfo],
    kept_types: frozenset[str] | None,
    reference_ids: Sequence[int],
    bandwidth_b_s: float,
) -> None:
    """Add greedy agreement with the reference, and weight bytes per token against bandwidth."""
    result["diverges_at"] = first_divergence(reference_ids, result["greedy_ids"])
    result["weight_bytes_per_token"] = weight_bytes_per_token(tensors, kept_types)
    tok_s = result["workloads"][DECODE]["median_decode_tok_s"]
    result["bandwidth_fraction"] = bandwidth_fraction(
        result["weight_bytes_per_token"], tok_s, bandwidth_b_s
    )


def speed_table(results: dict[str, Any], labels: dict[str, str], baseline: str) -> list[str]:
    """Markdown rows: each workload's median rate, decode against `baseline`, RSS, greedy check,
    and the 1-minute load average before and after the system ran (other work skews speeds).

    Decode workloads show decode tok/s; prefill workloads prompt tok/s (prompt tokens / TTFT).
    """
    names = [workload.name for workload in WORKLOADS]
    units = [f"{w.name} tok/s" + (" (TTFT)" if w.output_len == 1 else "") for w in WORKLOADS]
    ratio = f"{DECODE} vs {labels[baseline]}"
    header = ["system", *units, ratio, "peak RSS", "greedy vs HF", "load avg"]
    rows = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 3) + "|---|---:|"]
    base = results["systems"].get(baseline, {}).get("workloads")
    for key, label in labels.items():
        result = results["systems"].get(key, {"skipped": "not run"})
        if "skipped" in result:
            rows.append(f"| {label} |" + " - |" * (len(header) - 3) + f" {result['skipped']} | - |")
            continue
        cells = [label, *(_rate(result["workloads"][name]) for name in names)]
        decode = result["workloads"][DECODE]["median_decode_tok_s"]
        cells.append(f"{decode / base[DECODE]['median_decode_tok_s']:.2f}x" if base else "-")
        cells.append(f"{result['peak_rss_mib']:.0f} MiB")
        at = result["diverges_at"]
        cells.append("agrees" if at is None else f"diverges at {at}")
        cells.append("{:.1f}-{:.1f}".format(*result["load_avg_1m"]))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def bandwidth_table(results: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Markdown rows: weight bytes per decoded token, the decode rate, and the share of the
    measured bandwidth that streaming those bytes at that rate takes."""
    rows = [
        f"memory bandwidth (fastest sum over 1 GiB of float32, {results['threads']} threads): "
        f"{results['bandwidth_b_s'] / 1e9:.1f} GB/s",
        "",
        f"| system | weight MB/token | {DECODE} tok/s | weight GB/s | of bandwidth |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in labels.items():
        result = results["systems"].get(key, {"skipped": "not run"})
        if "skipped" in result:
            continue
        megabytes = result["weight_bytes_per_token"] / 1e6
        tok_s = result["workloads"][DECODE]["median_decode_tok_s"]
        rows.append(
            f"| {label} | {megabytes:.1f} | {tok_s:.1f} | {megabytes * tok_s / 1e3:.1f} | "
            f"{result['bandwidth_fraction']:.0%} |"
        )
    return rows


def _rate(timing: dict[str, float]) -> str:
    if "median_decode_tok_s" in timing:
        return f"{timing['median_decode_tok_s']:.1f}"
    return f"{timing['median_prefill_tok_s']:.0f} ({timing['median_ttft_ms']:.0f} ms)"
