"""`kvserve bench kv-dtype`: what each KV storage dtype costs in accuracy and buys in memory.

For every dtype of `--kv-cache-dtypes`, one engine (all other flags alike) reports:
- KV bytes per token as allocated (data + scales) next to the formula's;
- perplexity through the engine (`kvserve eval ppl`'s method, same text and windows),
  and top-1 agreement with the first dtype: the share of positions where both predict the
  same next token, teacher-forced (both read the true text, so one miss does not derail);
- decode tokens/s at batch 1 and batch 16 (`--batch-sizes`): decode-only steps timed after
  every request has finished its prompt, contexts of `--input-len` tokens and growing.
Speeds are measured in rounds, each round visiting every dtype, and the median taken, so a
slow spell of the machine lands on all dtypes alike; ratios are against the first dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

from kvserve.bench import workloads as wl
from kvserve.bench.offline import measured_kv_bytes
from kvserve.config import EngineConfig
from kvserve.eval.perplexity import PplConfig, perplexity, top1_agreement
from kvserve.eval.text import default_text, read_text
from kvserve.sampling_params import SamplingParams
from kvserve.utils.load_monitor import LoadMonitor
from kvserve.utils.plotting import print_table, pyplot

Record = dict[str, Any]
DEFAULT_DTYPES = "auto,float16,bfloat16,fp8_e4m3,int8"


def add_subcommand(commands: Any) -> None:
    parser = commands.add_parser(
        "kv-dtype", help="perplexity, bytes/token, decode speed per KV dtype"
    )
    parser.add_argument("--kv-cache-dtypes", default=DEFAULT_DTYPES, help="comma-separated")
    parser.add_argument("--batch-sizes", default="1,16", help="decode batch sizes")
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens before decoding")
    parser.add_argument("--decode-steps", type=int, default=32, help="timed decode steps a round")
    parser.add_argument("--num-rounds", type=int, default=3)
    parser.add_argument("--text-file", default=None, help="perplexity text (default: Genesis)")
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--num-windows", type=int, default=16)
    parser.add_argument("--skip-ppl", action="store_true", help="speed and bytes only")
    parser.add_argument("--plot", default=None, help="PNG of perplexity against bytes/token")
    parser.add_argument("--output-json", default=None, help="write the run's JSON record")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="max s to wait for idle")
    EngineConfig.add_cli_args(parser)


def run(args: argparse.Namespace, monitor: LoadMonitor) -> Record:
    from kvserve.llm import LLM

    dtypes = [d.strip() for d in args.kv_cache_dtypes.split(",") if d.strip()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not dtypes or not batch_sizes or min(batch_sizes) <= 0:
        raise ValueError("kv_cache_dtypes / batch_sizes: give at least one each, sizes > 0")
    base = EngineConfig.from_cli_args(args)
    llms = {d: LLM(**dataclasses.asdict(base.replace(kv_cache_dtype=d))) for d in dtypes}
    rows: dict[str, Record] = {
        d: {"kv_cache_dtype": d, **measured_kv_bytes(llm)} for d, llm in llms.items()
    }
    if not args.skip_ppl:
        config = PplConfig(
            window_len=args.window_len, num_windows=args.num_windows,
            batch_size=min(16, args.num_windows),
        )  # fmt: skip
        text = default_text() if args.text_file is None else read_text(args.text_file)
        tokenizer = next(iter(llms.values())).tokenizer
        if tokenizer is None:
            raise ValueError("model: has no tokenizer, so perplexity cannot read a text")
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        first_result: Record | None = None
        for dtype, llm in llms.items():
            result = perplexity(llm, token_ids, config)
            first_result = first_result or result
            rows[dtype]["top1_agreement"] = top1_agreement(first_result, result)
            rows[dtype].update(
                perplexity=result["perplexity"], num_scored_tokens=result["num_scored_tokens"]
            )
            print(f"{dtype}: perplexity {result['perplexity']:.4f}", flush=True)
    sample = monitor.wait_idle(args.wait_idle)
    if sample.warning:
        print(f"WARNING: {sample.warning} (before the speed rounds); timings may be distorted")
    speeds: dict[tuple[str, int], list[float]] = {(d, b): [] for d in dtypes for b in batch_sizes}
    for round_index in range(args.num_rounds):
        for dtype, llm in llms.items():
            for batch in batch_sizes:
                tok_s = decode_tok_s(llm, batch, args.input_len, args.decode_steps, round_index)
                speeds[dtype, batch].append(tok_s)
    first = dtypes[0]
    for dtype in dtypes:
        for batch in batch_sizes:
            median = statistics.median(speeds[dtype, batch])
            rows[dtype][f"decode_tok_s_b{batch}"] = median
            rows[dtype][f"decode_ratio_b{batch}"] = median / statistics.median(speeds[first, batch])
        if "perplexity" in rows[first] and "perplexity" in rows[dtype]:
            rows[dtype]["perplexity_change"] = (
                rows[dtype]["perplexity"] / rows[first]["perplexity"] - 1
            )
    results: Record = {
        "rows": list(rows.values()),
        "batch_sizes": batch_sizes,
        "load_warning": sample.warning,
    }
    print_rows(results)
    if args.plot and not args.skip_ppl:
        plot_ppl_vs_bytes(results["rows"], args.plot)
        print(f"wrote {args.plot}")
    return results


def decode_tok_s(llm: Any, batch: int, input_len: int, steps: int, seed: int) -> float:
    """Tokens/s of `steps` decode-only steps of `batch` requests with `input_len`-token prompts.

    Every request can outlive the timed steps (`max_tokens` covers the prefill steps too, in
    which early requests already decode), so each timed step decodes exactly `batch` rows;
    the requests are aborted afterwards.
    """
    engine = llm.engine
    vocab, exclude = wl.token_space(llm)
    prompts = wl.random_prompts([input_len] * batch, vocab, f"kv-dtype-{seed}-{batch}", exclude)
    params = SamplingParams(temperature=0, max_tokens=input_len + steps + 2, ignore_eos=True)
    ids = [f"kvd{seed}-{batch}-{i}" for i in range(batch)]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    while any(r.num_computed_tokens < input_len for r in engine.scheduler.requests.values()):
        engine.step()  # prompts (and their first tokens)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    assert len(engine.scheduler.requests) == batch, "a request finished inside the timed steps"
    for request_id in ids:
        engine.abort_request(request_id)
    return batch * steps / elapsed


def print_rows(results: Record) -> None:
    batch_sizes = results["batch_sizes"]
    header = ["kv_cache_dtype", "bytes/token", "formula", "perplexity", "change", "top-1 agree"]
    for batch in batch_sizes:
        header += [f"b={batch} tok/s", "ratio"]
    table = []
    for row in results["rows"]:
        change = row.get("perplexity_change")
        line = [
            row["kv_cache_dtype"], f"{row['measured']:,.0f}", f"{row['formula']:,}",
            f"{row['perplexity']:.4f}" if "perplexity" in row else "-",
            "-" if change is None else f"{100 * change:+.2f}%",
            f"{100 * row['top1_agreement']:.1f}%" if "top1_agreement" in row else "-",
        ]  # fmt: skip
        for batch in batch_sizes:
            line += [row[f"decode_tok_s_b{batch}"], f"{row[f'decode_ratio_b{batch}']:.2f}x"]
        table.append(line)
    print_table(header, table)


def plot_ppl_vs_bytes(rows: list[Record], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, row in enumerate(rows):
        ax.plot(row["measured"], row["perplexity"], "o")
        change = row.get("perplexity_change")
        label = row["kv_cache_dtype"] + ("" if change is None else f" ({100 * change:+.2f}%)")
        # alternate above / below, so dtypes of equal size (float16, bfloat16) stay legible
        ax.annotate(label, (row["measured"], row["perplexity"]), textcoords="offset points",
                    xytext=(6, 5 if i % 2 == 0 else -13), fontsize=9)  # fmt: skip
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel("KV bytes per token (data + scales, all layers)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("KV cache dtype: perplexity against memory", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
