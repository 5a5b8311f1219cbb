"""How benchmark results are shown: text tables on stdout, PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

Record = dict[str, Any]

# (result key, legend label, matplotlib format) of each curve of the no-cache plot.
NO_CACHE_SERIES: tuple[tuple[str, str, str], ...] = (
    ("kvserve_cache_tok_s", "kvserve, KV cache", "o-"),
    ("kvserve_no_cache_tok_s", "kvserve, no cache (recompute)", "o--"),
    ("transformers_cache_tok_s", "transformers, KV cache", "s-"),
    ("transformers_no_cache_tok_s", "transformers, use_cache=False", "s--"),
)
# Short column titles of the no-cache table (tok/s, and cache / no-cache speedups).
NO_CACHE_COLUMNS: dict[str, str] = {
    "kvserve_cache_tok_s": "kvserve cache",
    "kvserve_no_cache_tok_s": "kvserve none",
    "kvserve_cache_speedup": "speedup",
    "transformers_cache_tok_s": "HF cache",
    "transformers_no_cache_tok_s": "HF use_cache=False",
    "transformers_cache_speedup": "speedup",
}


def plot_no_cache(rows: Sequence[Mapping[str, float]], path: str, title: str) -> None:
    """Batch-1 decode tok/s against prompt length, with and without a KV cache (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [row["prompt_len"] for row in rows]
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for key, label, style in NO_CACHE_SERIES:
        if all(key in row for row in rows):
            ax.plot(lengths, [row[key] for row in rows], style, label=label)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("decode tokens/s, batch 1 (log scale)")
    ax.set_yscale("log")
    ax.set_xticks(lengths)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_latency(args: argparse.Namespace, results: Record) -> None:
    print(
        f"\nbench latency: batch 1, prompt {args.input_len}, output {args.output_len} tokens, "
        f"greedy, {args.num_iters} iterations (medians), {torch_threads()} threads"
    )
    keys = ["median_decode_tok_s", "median_ttft_ms", "median_tpot_ms", "median_e2e_latency_s"]
    systems = {name: r for name, r in results.items() if isinstance(r, dict)}
    header = ["system", "decode tok/s", "TTFT ms", "TPOT ms", "e2e s"]
    print_table(header, [[name, *(r[k] for k in keys)] for name, r in systems.items()])
    if "ratio_decode_tok_s" in results:
        print(
            f"kvserve / transformers decode tok/s: {results['ratio_decode_tok_s']:.2f}x "
            f"(greedy tokens agree for the first {results['greedy_tokens_agree']})"
        )


def print_no_cache(args: argparse.Namespace, rows: list[Record]) -> None:
    print(
        f"\nno-cache baseline: decode tok/s over {args.no_cache_output_len} output tokens, "
        f"{args.no_cache_iters} iteration(s) (medians)"
    )
    keys = [k for k in NO_CACHE_COLUMNS if k in rows[0]]
    header = ["prompt len", *(NO_CACHE_COLUMNS[k] for k in keys)]
    print_table(header, [[r["prompt_len"], *(r[k] for k in keys)] for r in rows])


def print_throughput(args: argparse.Namespace, results: Record) -> None:
    print(
        f"\nbench throughput: {args.num_prompts} prompts of {args.min_input_len}-"
        f"{args.max_input_len} tokens, output {args.output_len}, {torch_threads()} threads; "
        f"medians over iterations; transformers: batch {args.hf_batch_size}, left padded"
    )
    keys = [
        "num_iters",
        "elapsed_time",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
    ]
    systems = {name: r for name, r in results.items() if isinstance(r, dict)}
    header = ["system", "iters", "elapsed s", "req/s", "output tok/s", "total tok/s"]
    print_table(header, [[name, *(r[k] for k in keys)] for name, r in systems.items()])
    if "ratio_output_throughput" in results:
        print(f"kvserve / transformers output tok/s: {results['ratio_output_throughput']:.2f}x")


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """Right-aligned columns; floats with two decimals."""
    cells = [header] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
