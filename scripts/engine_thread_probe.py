"""The same engine work stepped from the main thread and from a second thread, alternately:
wall and CPU seconds of each (docs/benchmarks.md, "Serving at engine speed").

    .venv/bin/python scripts/engine_thread_probe.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/engine_thread_probe.py

`kvserve bench throughput` and `LLM.generate` step the engine from the main thread; the
server steps it from its engine thread. On a loaded machine the two differ by several times
(libgomp's spin-waiting), which decides any comparison of the two paths.
"""

from __future__ import annotations

import argparse
import threading
import time

from kvserve import LLM, SamplingParams
from kvserve.bench import workloads as wl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    llm = LLM(num_threads=args.num_threads)
    vocab, exclude = wl.token_space(llm)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    lengths = [args.input_len] * args.num_prompts

    def run(key: str) -> None:
        """Fresh prompts (no prefix hit), stepped to the end; one line of timings."""
        engine = llm.engine
        for i, prompt in enumerate(wl.random_prompts(lengths, vocab, key, exclude)):
            engine.add_request(f"{key}-{i}", {"prompt_token_ids": prompt}, params)
        start, cpu = time.perf_counter(), time.process_time()
        num_steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            num_steps += 1
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"{key:<12} {num_steps:3d} steps  wall {wall:6.1f} s  cpu {cpu:6.1f} s", flush=True)

    for index in range(args.rounds):
        run(f"main-{index}")
        thread = threading.Thread(target=run, args=(f"thread-{index}",))
        thread.start()
        thread.join()


if __name__ == "__main__":
    main()
