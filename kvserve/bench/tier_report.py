"""The table and the plot of `kvserve bench tiers` (and the table of `bench trace-tiers`)."""

from __future__ import annotations

from typing import Any

from kvserve.utils.plotting import print_table, pyplot

Record = dict[str, Any]


def print_tiers(results: Record) -> None:
    """One line per prefix length and place; a place whose cached tokens fall short of the
    prefix is marked MISS (its tier served nothing, or less than the prefix)."""
    header = ["prefix", "place", "TTFT ms", "cached tokens", "vs recompute"]
    rows = []
    for row in results["rows"]:
        for place in results["places"]:
            cell = row["places"][place]
            cached = f"{cell['cached_tokens']:,}"
            if cell["cached_tokens"] < cell["expected_cached_tokens"]:
                cached += " MISS"
            speedup = "-" if place == "recompute" else f"{cell['speedup']:.1f}x"
            rows.append([f"{row['prefix_len']:,}", place, cell["ttft_ms"], cached, speedup])
    print_table(header, rows)
    for place, length in results["crossover"].items():
        where = "never (up to the longest)" if length is None else f"from {length:,} tokens"
        print(f"{place}: restoring beats recomputing {where}")
    for place, served in results["served"].items():
        if not served:
            print(f"{place}: MISS, served fewer tokens than the prefix (tier not built? "
                  "writes not landed?); its times are recomputes")  # fmt: skip


def plot_tiers(results: Record, path: str) -> None:
    """TTFT against prefix length, one line per place, log scales."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lengths = results["lengths"]
    for place in results["places"]:
        ttfts = [row["places"][place]["ttft_ms"] for row in results["rows"]]
        style = "--" if place == "recompute" else "-"
        label = place if results["served"][place] else f"{place} (MISS: recomputed)"
        ax.plot(lengths, ttfts, style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
    ax.set_xlabel(f"prefix tokens (plus a suffix of {results['suffix_len']})")
    ax.set_ylabel("time to first token, ms (median)")
    ax.set_title("Where the prefix sits: TTFT per place", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_trace_tiers(results: Record) -> None:
    """Engine against simulator, one line per configuration."""
    header = ["config", "requests", "hit engine", "hit sim", "tier blocks engine",
              "tier blocks sim", "mean TTFT ms", "p99 TTFT ms", "sim mean prefill ms"]  # fmt: skip
    rows = []
    for row in results["rows"]:
        engine, sim = row["engine"], row["sim"]
        rows.append([
            row["config"], engine["num_requests"],
            f"{100 * engine['token_hit_ratio']:.1f}%", f"{100 * sim['token_hit_ratio']:.1f}%",
            _counts(engine["tier_hit_blocks"]), _counts(sim["tier_hit_blocks"]),
            engine["mean_ttft_ms"], engine["p99_ttft_ms"], sim["mean_prefill_ms"],
        ])  # fmt: skip
    print_table(header, rows)


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{name}:{value:,}" for name, value in counts.items()) or "-"
