"""Decode step time per decode attention path, interleaved in one process: kvserve's C++
kernel (cpp), inductor's fused kernel (fused), gather + SDPA (sdpa).

    .venv/bin/python scripts/decode_attention_ab.py --batch 64 --context 400 [--paths cpp,fused]

Starts `--batch` requests of `--context` random tokens on the default model with `--compile`
(that batch size only), prefills them, then switches the path every `--steps` decode steps
for `--rounds` rounds and prints each round's ms per step.
"""

from __future__ import annotations

import argparse
import time

from kvserve import LLM, SamplingParams
from kvserve.bench import workloads as wl
from kvserve.model.attention import CppDecodeBackend, FusedDecodeBackend, TorchSDPABackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--paths", default="cpp,fused,sdpa", help="of cpp, fused, sdpa")
    args = parser.parse_args()
    paths = args.paths.split(",")
    backends = {
        "cpp": CppDecodeBackend(),
        "fused": FusedDecodeBackend(),
        "sdpa": TorchSDPABackend(),
    }
    llm = LLM(num_threads=args.num_threads, compile=True, compile_sizes=(args.batch,))
    engine = llm.engine
    vocab, exclude = wl.token_space(llm)
    prompts = wl.random_prompts([args.context] * args.batch, vocab, "ab", exclude)
    decode_steps = len(paths) * args.rounds * (args.steps + 1) + 1
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
    current = [paths[0]]

    def prepare_switched(scheduled):  # type: ignore[no-untyped-def]
        inputs = prepare(scheduled)
        inputs.attn_metadata.backend = backends[current[0]]
        return inputs

    runner.prepare_inputs = prepare_switched  # type: ignore[method-assign]
    times: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(args.rounds):
        for path in paths:
            current[0] = path
            engine.step()  # untimed: the first step after a switch (and a compile, once)
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            times[path].append((time.perf_counter() - start) / args.steps * 1e3)
    for path in paths:
        print(f"{path:>6} ms/step: {', '.join(f'{t:.1f}' for t in times[path])}")


if __name__ == "__main__":
    main()
