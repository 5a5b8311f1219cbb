"""How benchmark results are shown: text tables on stdout, PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from kvserve.utils.plotting import print_table, pyplot

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
    plt = pyplot()
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
    systems = {name: results[name] for name in ("kvserve", "transformers") if name in results}
    header = ["system", "decode tok/s", "TTFT ms", "TPOT ms", "e2e s"]
    print_table(header, [[name, *(r[k] for k in keys)] for name, r in systems.items()])
    if "ratio_decode_tok_s" in results:
        print(
            f"kvserve / transformers decode tok/s: {results['ratio_decode_tok_s']:.2f}x "
            f"(greedy tokens agree for the first {results['greedy_tokens_agree']})"
        )
    kv = results.get("kv_bytes_per_token")
    if kv:
        print(
            f"KV bytes/token: measured {kv['measured']:.0f} (cache tensor bytes / slots); "
            f"formula 2 x {kv['num_layers']} layers x {kv['num_kv_heads']} kv heads x "
            f"{kv['head_dim']} head_dim x {kv['dtype_bytes']} bytes = {kv['formula']}"
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


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def print_prefix(args: argparse.Namespace, results: Record) -> None:
    shared = results["shared_system_prompt"]
    print(
        f"\nbench prefix (a): {args.num_requests} requests at once, shared system prompt "
        f"{args.system_len} + question {args.question_len} tokens, output {args.output_len}"
    )
    header = ["caching", "mean TTFT ms", "median TTFT ms", "elapsed s", "prompt tok", "computed"]
    rows = [
        [name.removeprefix("caching_"), *(shared[name][k] for k in _PREFIX_KEYS)]
        for name in ("caching_on", "caching_off")
    ]
    print_table(header, rows)
    print(f"mean TTFT off / on: {shared['mean_ttft_ratio']:.2f}x")
    turns = results["multi_turn"]
    print(
        f"\nbench prefix (b): {args.num_turns}-turn conversation, {args.message_len}-token "
        f"messages, {args.output_len}-token replies"
    )
    header = ["turn", "prompt", "TTFT on ms", "TTFT off ms", "off/on", "computed on", "cached",
              "reusable", "hit rate"]  # fmt: skip
    rows = []
    on, off = turns["caching_on"]["turns"], turns["caching_off"]["turns"]
    for a, b, ratio in zip(on, off, turns["ttft_ratio_per_turn"], strict=True):
        hit_rate = a["cached_tokens"] / a["prompt_tokens"]
        rows.append([a["turn"], a["prompt_tokens"], a["ttft_ms"], b["ttft_ms"], ratio,
                     a["computed_prompt_tokens"], a["cached_tokens"], a["reusable_tokens"],
                     hit_rate])  # fmt: skip
    print_table(header, rows)


_PREFIX_KEYS = (
    "mean_ttft_ms",
    "median_ttft_ms",
    "elapsed_s",
    "prompt_tokens",
    "computed_prompt_tokens",
)


def plot_multi_turn(turns: Record, path: str) -> None:
    """TTFT per conversation turn, prefix caching on vs off."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for name, style in (("caching_off", "s--"), ("caching_on", "o-")):
        rows = turns[name]["turns"]
        ax.plot([r["turn"] for r in rows], [r["ttft_ms"] for r in rows], style,
                label=f"prefix caching {name.removeprefix('caching_')}")  # fmt: skip
    ax.set_xlabel("conversation turn")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("multi-turn chat: each prompt is the whole history + a new message", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_memory(args: argparse.Namespace, results: Record) -> None:
    work = results["workload"]
    print(
        f"\nbench memory: {args.num_requests} requests at once, prompts {args.input_len_range}, "
        f"outputs {args.output_len_range} ({work['length_dist']}; means "
        f"{work['mean_input_len']:.0f} / {work['mean_output_len']:.0f})"
    )
    header = ["cache mode", "KV blocks", "peak running", "mean running", "slots used",
              "mean waste tok/req", "max waste", "preemptions", "elapsed s"]  # fmt: skip
    keys = ["num_kv_blocks", "peak_running", "mean_running", "slot_utilization",
            "mean_waste_tokens_per_request", "max_waste_tokens_per_request",
            "num_preemptions", "elapsed_s"]  # fmt: skip
    print_table(header, [[mode, *(results[mode][k] for k in keys)]
                         for mode in ("paged", "contiguous")])  # fmt: skip
    print(f"peak concurrency paged / contiguous: {results['concurrency_ratio']:.2f}x")
    rows = results["decode_vs_context"]
    if not rows:
        return
    print(f"\nbatch-1 decode ms/token over {args.decode_output_len} tokens vs context length")
    print_table(
        ["context", "cache ms/tok", "no cache ms/tok", "no cache / cache"],
        [[r["context_len"], r["cache_ms_per_token"], r["no_cache_ms_per_token"],
          r["no_cache_slowdown"]] for r in rows],
    )  # fmt: skip


def plot_memory(results: Record, path: str) -> None:
    """Two PNGs: `path` (slot use, paged vs contiguous) and `path` with a `_decode` suffix."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    modes = ("paged", "contiguous")
    used = [results[m]["slot_utilization"] * 100 for m in modes]
    peak = [results[m]["peak_running"] for m in modes]
    bars = ax.bar(modes, used, color=["tab:green", "tab:red"])
    for bar, n in zip(bars, peak, strict=True):
        ax.annotate(f"peak {n} running", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")  # fmt: skip
    ax.set_ylabel("reserved KV slots holding a token (%)")
    ax.set_ylim(0, 110)
    ax.set_title("same KV budget, same workload", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    rows = results["decode_vs_context"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    lengths = [r["context_len"] for r in rows]
    ax.plot(lengths, [r["cache_ms_per_token"] for r in rows], "o-", label="KV cache")
    ax.plot(lengths, [r["no_cache_ms_per_token"] for r in rows], "s--", label="no cache")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode time per token, batch 1 (ms, log)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    stem = path[:-4] if path.endswith(".png") else path
    fig.savefig(f"{stem}_decode.png", dpi=120)
    plt.close(fig)
