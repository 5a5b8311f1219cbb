"""Children of scripts/gguf_bench.py that run in kvserve's venv: kvserve itself, and the
transformers reference for the greedy-token check. Each reads a JSON spec, writes a JSON result.

    python scripts/gguf_bench_kvserve.py kvserve SPEC.json RESULT.json
    python scripts/gguf_bench_kvserve.py transformers SPEC.json RESULT.json
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import gguf_bench_common as common
import torch


def run_kvserve(spec: dict[str, Any]) -> dict[str, Any]:
    """The workloads through `LLM.generate_stream`, greedy with `ignore_eos`."""
    from kvserve import LLM, SamplingParams

    llm = LLM(
        model=spec["model"],
        num_threads=spec["threads"],
        max_model_len=common.CONTEXT_LEN,
        # KV for one request of CONTEXT_LEN tokens, like llama.cpp's n_ctx (+1: the engine's rule)
        num_kv_blocks=math.ceil(common.CONTEXT_LEN / 16) + 1,
        **spec["engine_args"],
    )

    def stream(prompt_ids: list[int], num_tokens: int) -> Iterator[int]:
        params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
        num_seen = 0
        for output in llm.generate_stream({"prompt_token_ids": prompt_ids}, params):
            token_ids = output.outputs[0].token_ids
            yield from token_ids[num_seen:]
            num_seen = len(token_ids)

    return common.run_spec(stream, spec)


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """transformers' greedy tokens for the check prompt, on the same GGUF file, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    folder, name = os.path.split(spec["gguf"])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    prompt_ids = tokenizer(spec["check_prompt"])["input_ids"]
    num_tokens = spec["check_len"]
    with torch.inference_mode():
        output = model.eval().generate(
            torch.tensor([prompt_ids]),  # (1, num_prompt_tokens)
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
        )  # (1, num_prompt_tokens + num_tokens)
    return {"prompt_ids": prompt_ids, "greedy_ids": output[0, len(prompt_ids) :].tolist()}


def main() -> None:
    mode, spec_path, result_path = sys.argv[1:]
    with open(spec_path) as f:
        spec = json.load(f)
    result = {"kvserve": run_kvserve, "transformers": run_transformers}[mode](spec)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
