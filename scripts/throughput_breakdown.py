"""Where `kvserve bench throughput`'s time goes: engine steps grouped by kind.

    .venv/bin/python scripts/throughput_breakdown.py --compile-sizes 64
    .venv/bin/python scripts/throughput_breakdown.py --compile-sizes '' --weight-format float32

The bench's workload (64 prompts of 32-512 tokens, seed 0, 128 tokens each) run step by step;
prints, per kind of step (prefill only, prefill chunks mixed with decodes, decode only), the
count, seconds, ms a step and tokens computed.
"""

from __future__ import annotations

import argparse
import collections
import time

from kvserve import LLM, SamplingParams
from kvserve.bench import workloads as wl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compile-sizes", default="1,2,4,8,16,32,64", help="'' = eager")
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--weight-format", default="auto", choices=["auto", "float32"])
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.compile_sizes.split(",") if s)
    llm = LLM(
        num_threads=args.num_threads,
        compile=bool(sizes),
        compile_sizes=sizes or (1,),
        weight_format=args.weight_format,
    )
    engine = llm.engine
    vocab, exclude = wl.token_space(llm)
    prompts = wl.random_prompts(wl.prompt_lengths(64, 32, 512, 0), vocab, "breakdown", exclude)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    runner = engine.model_runner
    execute = runner.execute
    batch = [0, 0]  # the last step's decode rows and prefill tokens

    def execute_recording(scheduler_output):  # type: ignore[no-untyped-def]
        rows = [len(s.token_ids) for s in scheduler_output.scheduled]
        batch[:] = [rows.count(1), sum(n for n in rows if n > 1)]
        return execute(scheduler_output)

    runner.execute = execute_recording  # type: ignore[method-assign]
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0])
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - step_start
        num_decodes, num_prefill = batch
        kind = "decode only" if not num_prefill else "prefill only" if not num_decodes else "mixed"
        entry = kinds[kind]
        entry[0] += 1
        entry[1] += elapsed
        entry[2] += num_decodes + num_prefill
    print(f"total {time.perf_counter() - start:.1f} s")
    for kind, (count, seconds, tokens) in kinds.items():
        print(
            f"{kind:>13}: {count:4.0f} steps, {seconds:6.1f} s, "
            f"{seconds / count * 1e3:6.0f} ms a step, {tokens:6.0f} tokens"
        )


if __name__ == "__main__":
    main()
