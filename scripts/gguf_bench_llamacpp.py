"""Child of scripts/gguf_bench.py that runs llama.cpp. It runs in the llama.cpp venv
(scripts/gguf_bench_env.py), never in kvserve's, and imports nothing from kvserve.

    python gguf_bench_llamacpp.py run SPEC.json RESULT.json
    python gguf_bench_llamacpp.py dequantize SRC.gguf DST.gguf    (every tensor to F32)

llama-cpp-python's defaults otherwise: KV cache in F16, no flash attention, batches of 512.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Iterator
from typing import Any

import gguf_bench_common as common
import llama_cpp
import numpy as np


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """The workloads, greedy (argmax of the logits) for a fixed number of tokens: no EOS stop."""
    llm = llama_cpp.Llama(
        model_path=spec["gguf"],
        n_ctx=common.CONTEXT_LEN,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        verbose=False,
    )
    num_vocab = llm.n_vocab()

    def stream(prompt_ids: list[int], num_tokens: int) -> Iterator[int]:
        llm.reset()  # forget the previous request: its KV is dropped by the next eval
        llm.eval(prompt_ids)
        for index in range(num_tokens):
            logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            token_id = int(np.ctypeslib.as_array(logits, shape=(num_vocab,)).argmax())
            yield token_id
            if index + 1 < num_tokens:
                llm.eval([token_id])

    return common.run_spec(stream, spec)


def dequantize(source: str, target: str) -> None:
    """Write `source` with every tensor in F32, through llama.cpp's own quantizer."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True  # read quantized tensors: dequantize them
    params.pure = True  # F32 everywhere, the token embedding and output included
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize failed on {source}: status {status}")


def main() -> None:
    mode, first, second = sys.argv[1:]
    if mode == "dequantize":
        dequantize(first, second)
        return
    with open(first) as f:
        spec = json.load(f)
    with open(second, "w") as f:
        json.dump(run(spec), f)


if __name__ == "__main__":
    main()
