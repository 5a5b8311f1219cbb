"""Time to first token of a prompt whose prefix is restored from the CPU or disk tier, against
recomputing it, on the default model (or --model). A first measurement until `kvserve bench
tiers` exists (issue 17).

    .venv/bin/python scripts/tier_restore_ttft.py [--lengths 512,1024,2048] [--repeats 3]

One engine per configuration, all in this process: no tier (recompute), CPU tier, disk tier
(a temporary directory). For each prompt length, each engine first computes the prompt (the
CPU and disk engines save its full blocks), then forgets its pool's prefix cache, and serves
the prompt again with max_tokens=1: the recompute engine computes it all, the others load
every full block but the last token's from their tier. The timed runs of the three engines
are interleaved; the median TTFT of each is printed, with the ratio to recompute.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile

import torch

from kvserve import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=1)


def ttft_ms(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    """Serve `prompt` once with a cold pool; its TTFT (ms) and cached tokens."""
    assert llm.engine.kv_cache_manager.reset_prefix_cache()
    (output,) = llm.generate([{"prompt_token_ids": prompt}], PARAMS, use_tqdm=False)
    assert llm.engine.flush_kv_saves(timeout=600)  # the disk tier is written in the background
    return 1000 * output.metrics.time_to_first_token, output.num_cached_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    common = {"model": args.model, "max_model_len": max(lengths) + 16}
    with tempfile.TemporaryDirectory() as directory:
        engines = {
            "recompute": LLM(**common),
            "cpu": LLM(**common, kv_cpu_bytes=2 << 30),
            "disk": LLM(**common, kv_disk_dir=directory),
        }
        vocab_size = engines["recompute"].engine.model_config.vocab_size
        results = []
        for length in lengths:
            prompt = [random.Random(length).randrange(10, vocab_size) for _ in range(length)]
            for llm in engines.values():
                ttft_ms(llm, prompt)  # computes it (and saves it to the tier)
            times: dict[str, list[float]] = {name: [] for name in engines}
            cached: dict[str, int] = {}
            for _ in range(args.repeats):
                for name, llm in engines.items():
                    ms, cached[name] = ttft_ms(llm, prompt)
                    times[name].append(ms)
            medians = {name: statistics.median(values) for name, values in times.items()}
            row = {"prompt_len": length, "ttft_ms": medians, "cached_tokens": cached}
            row["speedup"] = {n: medians["recompute"] / medians[n] for n in ("cpu", "disk")}
            results.append(row)
            print(json.dumps(row))


if __name__ == "__main__":
    main()
