"""The transformers baseline: the same weights, run in the same process as kvserve.

Every baseline is greedy fp32 `generate` with `min_new_tokens == max_new_tokens`, so it always
produces exactly the requested number of tokens (as kvserve's `ignore_eos` does).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from kvserve.bench.workloads import DecodeTiming, decode_timing, left_pad
from kvserve.default_model import transformers_source


def load_hf_model(model_path: str) -> Any:
    """transformers' own model class on the engine's resolved model (an HF folder, a .gguf
    file, the default model's folder of weights as stored), fp32, eval mode."""
    folder, gguf_file = transformers_source(model_path)
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=torch.float32
    )
    model.eval()
    return model


def pad_token_id(model: Any) -> int:
    """The id used to left-pad a batch: the model's pad token, else its (first) EOS, else 0."""
    config = model.generation_config
    for candidate in (config.pad_token_id, config.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


class _TokenTimer(BaseStreamer):
    """Records when each new token comes out of `generate` (batch 1 only)."""

    def __init__(self) -> None:
        self.token_times: list[float] = []
        self.token_ids: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first streams the prompt itself
            self._prompt_seen = True
            return
        now = time.perf_counter()
        new_ids = value.reshape(-1).tolist()
        self.token_ids.extend(new_ids)
        self.token_times.extend([now] * len(new_ids))

    def end(self) -> None:
        pass


def _greedy_kwargs(num_tokens: int, pad_id: int, use_cache: bool) -> dict[str, Any]:
    return {
        "max_new_tokens": num_tokens,
        "min_new_tokens": num_tokens,
        "do_sample": False,
        "num_beams": 1,
        "use_cache": use_cache,
        "pad_token_id": pad_id,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }


def time_hf_decode(
    model: Any, prompt_ids: Sequence[int], output_len: int, use_cache: bool = True
) -> tuple[DecodeTiming, list[int]]:
    """Batch-1 greedy generation, timed per token; returns the timing and the token ids."""
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # (1, prompt_len)
    attention_mask = torch.ones_like(input_ids)  # (1, prompt_len)
    timer = _TokenTimer()
    kwargs = _greedy_kwargs(output_len, pad_token_id(model), use_cache)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=timer, **kwargs)
    return decode_timing(start, timer.token_times), timer.token_ids


class HFBatchResult(NamedTuple):
    elapsed_s: float
    num_output_tokens: int
    num_padded_prompt_tokens: int  # prompt tokens computed, padding included


def time_hf_batches(
    model: Any, prompts: Sequence[Sequence[int]], output_len: int, batch_size: int
) -> HFBatchResult:
    """Left-padded batched `generate` over `prompts` in the given order, `batch_size` at a time."""
    pad_id = pad_token_id(model)
    kwargs = _greedy_kwargs(output_len, pad_id, use_cache=True)
    num_output = num_padded = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(prompts), batch_size):
            ids, mask = left_pad(prompts[first : first + batch_size], pad_id)
            input_ids = torch.tensor(ids, dtype=torch.long)  # (batch, longest_prompt)
            attention_mask = torch.tensor(mask, dtype=torch.long)  # (batch, longest_prompt)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            num_output += (out.shape[1] - input_ids.shape[1]) * out.shape[0]
            num_padded += input_ids.numel()
    return HFBatchResult(time.perf_counter() - start, num_output, num_padded)
