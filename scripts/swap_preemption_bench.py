"""Swap vs recompute preemption under memory pressure: throughput, preemptions, tokens
recomputed, on the default model (or --model), in one run (issue 17).

    .venv/bin/python scripts/swap_preemption_bench.py [--num-requests 16] [--prompt-len 256]
        [--max-tokens 64] [--num-kv-blocks 96] [--repeats 1] [--output swap.json]
        [--random-model DIR]   a mid-size random Llama (made in DIR once) instead of the
                               default model, for a quick run on a small or busy machine

Three engines in this process, each with the same small pool (`--num-kv-blocks`, far fewer
blocks than the batch needs, so requests are preempted):

    recompute       no tier: a victim's blocks are dropped; its resume hits in the pool
                    only what nobody reused, and recomputes the rest
    recompute+cpu   a CPU tier, recompute preemption: every full block is written through
                    to the tier after its forward, so a resume loads what the pool lost
    swap+cpu        the same tier, swap preemption: besides the write-through, the victim's
                    full blocks the tier no longer holds are saved before they are freed
    recompute+small, swap+small   the same two with a tier smaller than the working set
                    (`--small-kv-cpu-bytes`, 0 to skip), where the write-through of other
                    requests evicts a victim's blocks and only swap saves them again

Every engine serves the same greedy batch (random prompts, all queued at once) after one
warm-up request; counters are differences over the timed run. Output tokens must be equal
across the three (checked). Each repeat draws new prompts (so no tier already holds them) and
runs the engines interleaved; medians are printed as one JSON line per engine, with ratios to
recompute, and the machine (CPU model) goes into the record.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import torch

from kvserve import LLM, SamplingParams
from kvserve.bench.record import machine_info, write_record
from kvserve.outputs import EngineMetrics

# --random-model: ~27M parameters, SmolLM2's head_dim and GQA ratio, a smaller vocabulary.
RANDOM_LLAMA = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)

COUNTERS = (
    "num_preemptions",
    "num_preempted_recomputed_tokens",
    "num_swapped_out_blocks",
    "num_swapped_in_blocks",
    "computed_prompt_tokens",
    "generation_tokens",
)


def run_batch(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    """Serve the batch once; elapsed seconds, counter differences and the output tokens."""
    before = llm.get_metrics()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = llm.get_metrics()
    row: dict[str, Any] = {name: _diff(after, before, name) for name in COUNTERS}
    row["elapsed_s"] = elapsed
    row["tokens"] = [output.outputs[0].token_ids for output in outputs]
    return row


def _diff(after: EngineMetrics, before: EngineMetrics, name: str) -> int:
    return int(getattr(after, name) - getattr(before, name))


def summarize(runs: list[dict[str, Any]], num_prompt: int) -> dict[str, Any]:
    """Medians over the repeats (each serves the same number of tokens)."""
    elapsed = statistics.median(run["elapsed_s"] for run in runs)
    num_output = sum(len(tokens) for tokens in runs[0]["tokens"])
    summary: dict[str, Any] = {
        name: statistics.median(run[name] for run in runs) for name in COUNTERS
    }
    summary["elapsed_s"] = round(elapsed, 3)
    summary["output_throughput"] = round(num_output / elapsed, 2)  # tok/s
    summary["total_throughput"] = round((num_prompt + num_output) / elapsed, 2)
    return summary


def random_model(folder: str) -> str:
    """A random Llama checkpoint (RANDOM_LLAMA) saved in `folder`, made there once."""
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    if not (Path(folder) / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**RANDOM_LLAMA)).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--random-model", default=None, metavar="DIR")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-kv-blocks", type=int, default=96)
    parser.add_argument("--kv-cpu-bytes", type=int, default=2 << 30)
    parser.add_argument("--small-kv-cpu-bytes", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="write the JSON record here")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    model = random_model(args.random_model) if args.random_model else args.model
    common = {
        "model": model,
        "num_kv_blocks": args.num_kv_blocks,
        "max_model_len": args.prompt_len + args.max_tokens,
        "max_num_seqs": args.num_requests,
    }
    tiers = {"cpu": args.kv_cpu_bytes, "small": args.small_kv_cpu_bytes}
    engines = {"recompute": LLM(**common)}
    for tier, num_bytes in tiers.items():
        for mode in ("recompute", "swap") if num_bytes else ():
            engines[f"{mode}+{tier}"] = LLM(**common, kv_cpu_bytes=num_bytes, preemption_mode=mode)
    vocab_size = engines["recompute"].engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for llm in engines.values():  # warm-up: first forward, kernels; no preemption
        llm.generate([{"prompt_token_ids": [11, 12, 13]}], params, use_tqdm=False)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for repeat in range(args.repeats):
        rng = random.Random(repeat)
        prompts = [
            [rng.randrange(10, vocab_size) for _ in range(args.prompt_len)]
            for _ in range(args.num_requests)
        ]
        for name, llm in engines.items():
            runs[name].append(run_batch(llm, prompts, params))
    num_prompt = args.num_requests * args.prompt_len
    results = {name: summarize(name_runs, num_prompt) for name, name_runs in runs.items()}
    base = results["recompute"]
    for name, result in results.items():
        result["throughput_ratio"] = round(
            result["output_throughput"] / base["output_throughput"], 3
        )
        result["recomputed_ratio"] = round(
            result["num_preempted_recomputed_tokens"]
            / max(1, base["num_preempted_recomputed_tokens"]),
            3,
        )
        print(json.dumps({"engine": name, **result}))
    equal = all(
        run["tokens"] == runs["recompute"][index]["tokens"]
        for name_runs in runs.values()
        for index, run in enumerate(name_runs)
    )
    print(json.dumps({"outputs_equal": equal}))
    if args.output:
        record = {"args": vars(args), "machine": machine_info(), "results": results}
        write_record({**record, "outputs_equal": equal}, args.output)


if __name__ == "__main__":
    main()
