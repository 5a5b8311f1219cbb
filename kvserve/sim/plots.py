"""PNG of `kvserve trace simulate`: block hit ratio against cache capacity, one line per policy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvserve.utils.plotting import pyplot

_STYLES = {"lru": "o-", "fifo": "s--", "lfu": "^--", "belady": "k*-"}


def plot_hit_ratio(results: Sequence[dict[str, Any]], path: str, title: str) -> None:
    """Hit ratio (%) against capacity (log x) per policy; an unbounded run is a dotted line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    policies = list(dict.fromkeys(r["policy"] for r in results))
    for policy in policies:
        points = sorted(
            (r["capacity_blocks"], 100 * r["block_hit_ratio"])
            for r in results
            if r["policy"] == policy and not r["unbounded"]
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, _STYLES.get(policy, "o-"), label=policy)
    unbounded = [r for r in results if r["unbounded"]]
    if unbounded:
        ax.axhline(100 * unbounded[0]["block_hit_ratio"], color="grey", linestyle=":",
                   label="unbounded cache")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("cache capacity (trace blocks, log scale)")
    ax.set_ylabel("prompt blocks hit (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
