"""What `kvserve bench serve` measured: per-request results, vLLM's metrics, tables, plots.

Pure Python except the plot (matplotlib). Times are seconds from the start of a run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, NamedTuple

from kvserve.bench.workloads import percentile, summarize

# Metrics shown in the comparison table, in order.
TABLE_METRICS: tuple[str, ...] = (
    "completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms",
    "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
    "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "cached_token_ratio", "goodput",
)  # fmt: skip


class RequestResult(NamedTuple):
    """One request as the client saw it; times in seconds from the start of the run."""

    tag: str
    sent_s: float
    ok: bool
    error: str
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    chunk_times: list[float]  # arrival of each streamed chunk that carried a token

    @property
    def ttft_s(self) -> float:
        return self.chunk_times[0] - self.sent_s

    @property
    def e2el_s(self) -> float:
        return self.chunk_times[-1] - self.sent_s

    @property
    def itls_s(self) -> list[float]:
        times = self.chunk_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)


def compute_metrics(
    results: Sequence[RequestResult],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict[str, Any]:
    """vLLM bench's metrics over the successful requests, plus a breakdown per tag."""
    metrics = _metrics(results, duration_s, slo_ttft_ms, slo_tpot_ms)
    tags = sorted({r.tag for r in results})
    if len(tags) > 1:
        metrics["by_tag"] = {
            tag: _metrics([r for r in results if r.tag == tag], duration_s, slo_ttft_ms,
                          slo_tpot_ms)
            for tag in tags
        }  # fmt: skip
    return metrics


def _metrics(
    results: Sequence[RequestResult],
    duration_s: float,
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    prompt = sum(r.prompt_tokens for r in done)
    output = sum(r.output_tokens for r in done)
    metrics: dict[str, Any] = {
        "completed": len(done),
        "failed": len(failed),
        "duration_s": duration_s,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "total_cached_tokens": sum(r.cached_tokens for r in done),
        "cached_token_ratio": sum(r.cached_tokens for r in done) / prompt if prompt else 0.0,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output / duration_s,
        "total_token_throughput": (prompt + output) / duration_s,
    }
    if failed:
        metrics["first_errors"] = sorted({r.error for r in failed})[:5]
    if not done:
        return metrics
    tpots = [t * 1e3 for r in done if (t := r.tpot_s) is not None]
    itls = [gap * 1e3 for r in done for gap in r.itls_s]
    metrics.update(summarize("ttft_ms", [r.ttft_s * 1e3 for r in done]))
    metrics.update(summarize("tpot_ms", tpots or [math.nan]))
    metrics.update(summarize("itl_ms", itls or [math.nan]))
    metrics.update(summarize("e2el_ms", [r.e2el_s * 1e3 for r in done]))
    metrics["p90_ttft_ms"] = percentile([r.ttft_s * 1e3 for r in done], 90.0)
    metrics["p90_itl_ms"] = percentile(itls, 90.0) if itls else math.nan
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = [r for r in done if _meets_slo(r, slo_ttft_ms, slo_tpot_ms)]
        metrics["good_requests"] = len(good)
        metrics["goodput"] = len(good) / duration_s
    return metrics


def _meets_slo(result: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and result.ttft_s * 1e3 > slo_ttft_ms:
        return False
    tpot = result.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * 1e3 <= slo_tpot_ms


def print_run(label: str, metrics: dict[str, Any]) -> None:
    print(f"\n=== {label} ===")
    for key, value in metrics.items():
        if key == "by_tag":
            for tag, sub in value.items():
                print(f"  [{tag}] completed {sub['completed']}, " + ", ".join(
                    f"{name} {sub[name]:.1f}" for name in
                    ("mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "p99_itl_ms") if name in sub
                ))  # fmt: skip
        elif isinstance(value, float):
            print(f"  {key:<24} {value:,.2f}")
        else:
            print(f"  {key:<24} {value}")


def print_comparison(runs: list[dict[str, Any]]) -> None:
    """Every run's metrics side by side, then each later run's ratio to the first."""
    from kvserve.utils.plotting import print_table

    labels = [str(run["label"]) for run in runs]
    header = ["metric", *labels, *[f"{label} / {labels[0]}" for label in labels[1:]]]
    keys = [(None, key) for key in TABLE_METRICS if key in runs[0]["metrics"]]
    for tag in runs[0]["metrics"].get("by_tag", {}):
        keys += [(tag, key) for key in ("mean_ttft_ms", "mean_itl_ms", "p99_itl_ms")]
    rows = []
    for tag, key in keys:
        values = [
            (run["metrics"] if tag is None else run["metrics"]["by_tag"][tag]).get(key, math.nan)
            for run in runs
        ]
        ratios = [v / values[0] if values[0] else math.nan for v in values[1:]]
        name = key if tag is None else f"[{tag}] {key}"
        rows.append([name, *[f"{v:,.2f}" for v in values], *[f"{r:.3f}" for r in ratios]])
    print()
    print_table(header, rows)


def plot_runs(runs: list[dict[str, Any]], path: str) -> None:
    """Two panels: the CDF of TTFT and of ITL (per tag when there are several), per run."""
    from kvserve.utils.plotting import pyplot

    plt = pyplot()
    fig, (ax_ttft, ax_itl) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for run in runs:
        _cdf(ax_ttft, run["ttfts_ms"], str(run["label"]))
        for tag, itls in run["itls_ms"].items():
            name = run["label"] if len(run["itls_ms"]) == 1 else f"{run['label']} [{tag}]"
            _cdf(ax_itl, itls, str(name))
    ax_ttft.set_xlabel("time to first token (ms)")
    ax_itl.set_xlabel("inter-token latency (ms, log scale)")
    ax_itl.set_xscale("log")
    for ax in (ax_ttft, ax_itl):
        ax.set_ylabel("fraction of requests / gaps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        return
    ordered = sorted(values)
    n = len(ordered)
    ax.plot(
        ordered,
        [(i + 1) / n for i in range(n)],
        label=f"{label} (median {statistics.median(ordered):.0f})",
    )
