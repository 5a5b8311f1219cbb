"""PNG plots of `kvserve trace stats` (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from kvserve.trace.stats import RATE_BIN_S, TraceStats
from kvserve.utils.plotting import pyplot


def plot_stats(stats: TraceStats, folder: str) -> list[str]:
    """Write arrivals.png, lengths.png, reuse.png and skew.png into `folder`; their paths."""
    plt = pyplot()
    paths = []

    fig, ax = plt.subplots(figsize=(7, 3.5))
    minutes = [i * RATE_BIN_S / 60 for i in range(len(stats.arrivals_per_bin))]
    ax.plot(minutes, [n / RATE_BIN_S for n in stats.arrivals_per_bin])
    ax.set_xlabel("trace time (minutes)")
    ax.set_ylabel("arrivals / s (1 min bins)")
    paths.append(_save(fig, plt, folder, "arrivals.png"))

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, values, name in zip(
        axes, (stats.input_lengths, stats.output_lengths), ("input", "output"), strict=True
    ):
        ax.hist(values, bins=50)
        ax.set_xlabel(f"{name} length (tokens)")
        ax.set_ylabel("requests")
    paths.append(_save(fig, plt, folder, "lengths.png"))

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    lifetimes = [b.last_s - b.first_s for b in stats.blocks.values() if b.hits]
    series: tuple[Sequence[float], ...] = (
        stats.reuse_distances,
        stats.reuse_intervals_s,
        lifetimes,
    )
    for ax, data, label in zip(
        axes,
        series,
        ("reuse distance (distinct blocks)", "reuse interval (s)", "reused block lifetime (s)"),
        strict=True,
    ):
        _cdf(ax, data)
        ax.set_xlabel(label)
        ax.set_xscale("symlog")
    axes[0].set_ylabel("share of hits (CDF)")
    axes[2].set_ylabel("share of reused blocks (CDF)")
    paths.append(_save(fig, plt, folder, "reuse.png"))

    fig, ax = plt.subplots(figsize=(5, 4))
    hits = sorted((b.hits for b in stats.blocks.values()), reverse=True)
    total = sum(hits) or 1
    running, shares = 0, []
    for h in hits:
        running += h
        shares.append(running / total)
    ax.plot([(i + 1) / len(hits) for i in range(len(hits))], shares)
    ax.set_xscale("log")
    ax.set_xlabel("most-hit share of blocks")
    ax.set_ylabel("share of all hits")
    paths.append(_save(fig, plt, folder, "skew.png"))
    return paths


def _cdf(ax: object, values: Sequence[float]) -> None:
    ordered = sorted(values)
    if ordered:
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))])  # type: ignore[attr-defined]
    ax.grid(True, alpha=0.3)  # type: ignore[attr-defined]


def _save(fig: object, plt: object, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=110)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[attr-defined]
    return path
