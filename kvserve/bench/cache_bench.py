"""`kvserve bench prefix | memory`: what reusing and paging the KV cache buys, measured.

prefix  (a) many requests sharing one long system prompt, all submitted at once;
        (b) a multi-turn conversation whose prompt is the whole history plus a new message.
        Each runs on two engines in the same process, prefix caching on and off: time to
        first token, prompt tokens computed, hit rate against the reusable fraction.
memory  one workload of realistic lengths under one KV budget, `paged` against
        `contiguous`: peak requests running at once and the fraction of reserved KV slots
        that hold a token, sampled after every step; then batch-1 decode time per token
        against context length with the cache and without (`cache_mode="none"`).

Prompts are random token ids (kvserve.bench.workloads), greedy, `ignore_eos`, so both sides
of every comparison do exactly the same work.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

from kvserve.bench import plots
from kvserve.bench import workloads as wl
from kvserve.config import EngineConfig
from kvserve.utils.load_monitor import LoadMonitor

Record = dict[str, Any]


def add_subcommands(commands: Any) -> list[argparse.ArgumentParser]:
    prefix = commands.add_parser("prefix", help="prefix caching on vs off: shared prompt, chat")
    prefix.add_argument("--num-requests", type=int, default=32)
    prefix.add_argument("--system-len", type=int, default=1024)
    prefix.add_argument("--question-len", type=int, default=32)
    prefix.add_argument("--num-turns", type=int, default=6)
    prefix.add_argument("--message-len", type=int, default=128)
    prefix.add_argument("--output-len", type=int, default=32)
    memory = commands.add_parser("memory", help="paged vs contiguous under one KV budget")
    memory.add_argument("--num-requests", type=int, default=64)
    memory.add_argument("--input-len-range", default="64,1024", help="min,max prompt tokens")
    memory.add_argument("--output-len-range", default="16,512", help="min,max output tokens")
    memory.add_argument(
        "--length-dist",
        choices=("loguniform", "uniform"),
        default="loguniform",
        help="lengths log-uniform in the range (many short, few long, like chat traffic) "
        "or uniform",
    )
    memory.add_argument("--decode-context-lens", default="128,256,512,1024,2048")
    memory.add_argument("--decode-output-len", type=int, default=16)
    for parser in (prefix, memory):
        parser.add_argument("--plot", default=None, help="PNG path (memory: prefix of 2 PNGs)")
        parser.add_argument("--output-json", default=None, help="write the run's JSON record")
        parser.add_argument("--wait-idle", type=float, default=0.0, help="max s to wait for idle")
        EngineConfig.add_cli_args(parser)
    return [prefix, memory]


def _llm(args: argparse.Namespace, **overrides: Any) -> Any:
    from kvserve.llm import LLM

    config = EngineConfig.from_cli_args(args).replace(**overrides)
    return LLM(**dataclasses.asdict(config))


def _greedy(max_tokens: int) -> Any:
    from kvserve.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _warm(llm: Any, vocab: tuple[int, frozenset[int]]) -> None:
    prompts = wl.random_prompts([16, 200], vocab[0], "warmup", vocab[1])
    llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(4), use_tqdm=False)
    llm.reset_prefix_cache()


# ---- prefix -------------------------------------------------------------------------------


def run_prefix(args: argparse.Namespace, monitor: LoadMonitor) -> Record:
    llms = {caching: _llm(args, enable_prefix_caching=caching) for caching in (True, False)}
    vocab = wl.token_space(llms[True])
    for llm in llms.values():  # first calls pay one-time costs; keep them out of the timings
        _warm(llm, vocab)
    seed = args.seed if args.seed is not None else 0
    results: Record = {"shared_system_prompt": {}, "multi_turn": {}}
    _check_load(args, monitor, results, "shared system prompt")
    for caching, llm in llms.items():
        name = "caching_on" if caching else "caching_off"
        results["shared_system_prompt"][name] = shared_system_prompt(llm, args, vocab, seed)
    _check_load(args, monitor, results, "multi-turn")
    for caching, llm in llms.items():
        name = "caching_on" if caching else "caching_off"
        results["multi_turn"][name] = multi_turn(llm, args, vocab, seed)
    on, off = (results["multi_turn"][k]["turns"] for k in ("caching_on", "caching_off"))
    results["multi_turn"]["ttft_ratio_per_turn"] = [
        b["ttft_ms"] / a["ttft_ms"] for a, b in zip(on, off, strict=True)
    ]
    shared = results["shared_system_prompt"]
    shared["mean_ttft_ratio"] = (
        shared["caching_off"]["mean_ttft_ms"] / shared["caching_on"]["mean_ttft_ms"]
    )
    plots.print_prefix(args, results)
    if args.plot:
        plots.plot_multi_turn(results["multi_turn"], args.plot)
    return results


def shared_system_prompt(
    llm: Any, args: argparse.Namespace, vocab: tuple[int, frozenset[int]], seed: int
) -> Record:
    """All requests at once: one long system prompt, each with its own question."""
    vocab_size, exclude = vocab
    system = wl.random_token_ids(args.system_len, vocab_size, f"system:{seed}", exclude)
    questions = wl.random_prompts(
        [args.question_len] * args.num_requests, vocab_size, f"questions:{seed}", exclude
    )
    before = llm.get_metrics()
    start = time.perf_counter()
    prompts = [{"prompt_token_ids": system + q} for q in questions]
    outputs = llm.generate(prompts, _greedy(args.output_len), use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = llm.get_metrics()
    ttfts = [1000 * o.metrics.time_to_first_token for o in outputs]
    llm.reset_prefix_cache()
    return {
        "elapsed_s": elapsed,
        "mean_ttft_ms": statistics.fmean(ttfts),
        "median_ttft_ms": statistics.median(ttfts),
        "prompt_tokens": after.prompt_tokens - before.prompt_tokens,
        "computed_prompt_tokens": after.computed_prompt_tokens - before.computed_prompt_tokens,
        "cached_tokens": sum(o.num_cached_tokens for o in outputs),
    }


def multi_turn(
    llm: Any, args: argparse.Namespace, vocab: tuple[int, frozenset[int]], seed: int
) -> Record:
    """One conversation, turn after turn; each prompt is the history plus a new message.

    `reusable_tokens` is what an ideal cache could serve: the previous turn's prompt and
    reply minus the reply's last token (sampled, never fed back), rounded down to whole
    blocks. The hit rate should equal `reusable_tokens / prompt_tokens`.
    """
    vocab_size, exclude = vocab
    block_size = llm.engine.config.block_size
    history: list[int] = []
    turns = []
    reusable = 0
    for turn in range(args.num_turns):
        message = wl.random_token_ids(args.message_len, vocab_size, f"turn:{seed}:{turn}", exclude)
        prompt = history + message
        before = llm.get_metrics()
        (output,) = llm.generate({"prompt_token_ids": prompt}, _greedy(args.output_len), False)
        after = llm.get_metrics()
        turns.append({
            "turn": turn + 1,
            "prompt_tokens": len(prompt),
            "ttft_ms": 1000 * output.metrics.time_to_first_token,
            "computed_prompt_tokens": after.computed_prompt_tokens - before.computed_prompt_tokens,
            "cached_tokens": output.num_cached_tokens,
            "reusable_tokens": reusable if llm.engine.config.enable_prefix_caching else 0,
        })  # fmt: skip
        history = prompt + output.outputs[0].token_ids
        reusable = (len(history) - 1) // block_size * block_size
    llm.reset_prefix_cache()
    return {"turns": turns}


def _check_load(args: argparse.Namespace, monitor: LoadMonitor, results: Record, when: str) -> None:
    sample = monitor.wait_idle(args.wait_idle)
    results.setdefault("load_warnings", [])
    if sample.warning:
        results["load_warnings"].append(f"{when}: {sample.warning}")
        print(f"WARNING: {sample.warning} (before {when}); timings may be distorted")


# ---- memory -------------------------------------------------------------------------------


def run_memory(args: argparse.Namespace, monitor: LoadMonitor) -> Record:
    seed = args.seed if args.seed is not None else 0
    in_min, in_max = _range(args.input_len_range, "input_len_range")
    out_min, out_max = _range(args.output_len_range, "output_len_range")
    draw = wl.loguniform_lengths if args.length_dist == "loguniform" else wl.prompt_lengths
    input_lens = draw(args.num_requests, in_min, in_max, seed)
    output_lens = draw(args.num_requests, out_min, out_max, seed + 1)
    results: Record = {
        "workload": {
            "length_dist": args.length_dist,
            "mean_input_len": statistics.fmean(input_lens),
            "mean_output_len": statistics.fmean(output_lens),
            "input_lens": input_lens,
            "output_lens": output_lens,
        }
    }
    for mode in ("paged", "contiguous"):
        _check_load(args, monitor, results, f"memory {mode}")
        llm = _llm(args, cache_mode=mode, enable_prefix_caching=False)
        _warm(llm, wl.token_space(llm))
        results[mode] = occupancy(llm, input_lens, output_lens, seed)
        del llm
    results["concurrency_ratio"] = (
        results["paged"]["peak_running"] / results["contiguous"]["peak_running"]
    )
    _check_load(args, monitor, results, "decode vs context length")
    results["decode_vs_context"] = decode_vs_context(args, seed)
    plots.print_memory(args, results)
    if args.plot:
        plots.plot_memory(results, args.plot)
    return results


def occupancy(llm: Any, input_lens: list[int], output_lens: list[int], seed: int) -> Record:
    """Run the whole workload at once; sample KV occupancy after every engine step."""
    engine = llm.engine
    manager = engine.kv_cache_manager
    vocab_size, exclude = wl.token_space(llm)
    prompts = wl.random_prompts(input_lens, vocab_size, f"memory:{seed}", exclude)
    for index, (prompt, out_len) in enumerate(zip(prompts, output_lens, strict=True)):
        engine.add_request(f"m{index}", {"prompt_token_ids": prompt}, _greedy(out_len))
    samples: list[tuple[int, int, int]] = []  # (running, slots reserved, tokens held)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.scheduler.running
        slots = manager.num_used_blocks * manager.block_size
        held = sum(r.num_computed_tokens for r in running)
        samples.append((len(running), slots, held))
    elapsed = time.perf_counter() - start
    busy = [s for s in samples if s[0] > 0]
    waste = [(slots - held) / n for n, slots, held in busy]
    return {
        "num_kv_blocks": manager.num_usable_blocks,
        "block_size": manager.block_size,
        "elapsed_s": elapsed,
        "num_steps": len(samples),
        "peak_running": max(n for n, _, _ in samples),
        "mean_running": statistics.fmean(n for n, _, _ in busy),
        "slot_utilization": sum(h for _, _, h in busy) / sum(s for _, s, _ in busy),
        "mean_waste_tokens_per_request": statistics.fmean(waste),
        "max_waste_tokens_per_request": max(waste),
        "num_preemptions": engine.get_metrics().num_preemptions,
    }


def decode_vs_context(args: argparse.Namespace, seed: int) -> list[Record]:
    """Batch-1 decode ms per token at each context length, with the cache and without."""
    from kvserve.bench.offline import time_kvserve_decode

    lengths = [int(v) for v in args.decode_context_lens.split(",") if v.strip()]
    rows: list[Record] = []
    if not lengths:
        return rows
    max_model_len = max(lengths) + args.decode_output_len
    llms = {
        mode: _llm(args, cache_mode=mode, compile=False, max_model_len=max_model_len)
        for mode in ("paged", "none")
    }
    vocab_size, exclude = wl.token_space(llms["paged"])
    for llm in llms.values():  # warm up
        time_kvserve_decode(llm, wl.random_token_ids(16, vocab_size, "warm", exclude), 4)
    for length in lengths:
        prompt = wl.random_token_ids(length, vocab_size, f"context:{seed}:{length}", exclude)
        row: Record = {"context_len": length}
        for mode, llm in llms.items():
            timing, _ = time_kvserve_decode(llm, prompt, args.decode_output_len)
            name = "cache" if mode == "paged" else "no_cache"
            row[f"{name}_ms_per_token"] = 1000 * timing.tpot_s
        row["no_cache_slowdown"] = row["no_cache_ms_per_token"] / row["cache_ms_per_token"]
        rows.append(row)
    return rows


def _range(text: str, name: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{name}: expected 'min,max', got {text!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"{name}: need 1 <= min <= max, got {text!r}")
    return low, high
