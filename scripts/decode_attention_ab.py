"""Decode step time with the fused decode attention vs gather + SDPA, interleaved in one process.

    .venv/bin/python scripts/decode_attention_ab.py --batch 64 --context 400

Starts `--batch` requests of `--context` random tokens on the default model with `--compile`
(that batch size only), prefills them, then alternates the attention kernel every
`--steps` decode steps for `--rounds` rounds and prints each round's ms per step.
"""

from __future__ import annotations

import argparse
import time

from kvserve import LLM, SamplingParams
from kvserve.bench import workloads as wl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args()
    llm = LLM(num_threads=args.num_threads, compile=True, compile_sizes=(args.batch,))
    engine = llm.engine
    vocab, exclude = wl.token_space(llm)
    prompts = wl.random_prompts([args.context] * args.batch, vocab, "ab", exclude)
    decode_steps = 2 * args.rounds * (args.steps + 1) + 1
    params = SamplingParams(temperature=0, max_tokens=decode_steps, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    scheduler = engine.scheduler
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running) or (
        scheduler.waiting
    ):
        engine.step()
    runner = engine.model_runner
    prepare = runner.prepare_inputs
    fused = [True]

    def prepare_switched(scheduled):  # type: ignore[no-untyped-def]
        inputs = prepare(scheduled)
        inputs.attn_metadata.fused_decode = fused[0]
        return inputs

    runner.prepare_inputs = prepare_switched  # type: ignore[method-assign]
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for kernel in (True, False):
            fused[0] = kernel
            engine.step()  # untimed: the first step after a switch
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            times[kernel].append((time.perf_counter() - start) / args.steps * 1e3)
    for kernel, label in ((True, "fused"), (False, "gather + SDPA")):
        print(f"{label:>14} ms/step: {', '.join(f'{t:.0f}' for t in times[kernel])}")


if __name__ == "__main__":
    main()
