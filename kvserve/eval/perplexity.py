"""Perplexity and top-1 agreement of a text through the engine, KV cache in its dtype.

The text's tokens are cut into windows of `window_len`. Each window is one request, its
prompt the window, with `SamplingParams(prompt_logprobs=1, max_tokens=1)`: the engine
prefills it in chunks (its `max_num_batched_tokens`), every chunk writing its K/V into the
cache and attending to all earlier K/V *as stored* (quantized in a quantized cache), and
gives back each prompt token's logprob and the top-1 token at the position before it.
`batch_size` windows go in at a time, so their chunks share steps.

    window:  [ t0 | t1 t2 ... t(n-1) ]      position p scores token p + 1 (t0 is context only)
    perplexity = exp(mean NLL over the scored tokens of all windows)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

# The prompt's logprobs are the result; the one sampled token is not used.
SCORING_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)


@dataclass(frozen=True)
class PplConfig:
    window_len: int = 512
    num_windows: int = 16
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("window_len", "num_windows", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.window_len < 2:
            raise ValueError(f"window_len: must be at least 2, got {self.window_len}")


def perplexity(llm: Any, token_ids: Sequence[int], config: PplConfig) -> dict[str, Any]:
    """Perplexity of `token_ids` through `llm`'s engine and KV cache (see module doc).

    Raises:
        ValueError: the text is shorter than one window.
    """
    num_windows = min(config.num_windows, len(token_ids) // config.window_len)
    if num_windows == 0:
        raise ValueError(
            f"text_file: {len(token_ids)} tokens, fewer than one window of "
            f"{config.window_len} (lower --window-len)"
        )
    windows = [
        {"prompt_token_ids": list(token_ids[i * config.window_len : (i + 1) * config.window_len])}
        for i in range(num_windows)
    ]
    total_nll, total_count = 0.0, 0
    predictions: list[int] = []
    for start in range(0, num_windows, config.batch_size):
        batch = windows[start : start + config.batch_size]
        for output in llm.generate(batch, SCORING_PARAMS, use_tqdm=False):
            nll, top1 = _score(output)
            total_nll += nll
            total_count += len(top1)
            predictions.extend(top1)
    mean_nll = total_nll / total_count
    return {
        "perplexity": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "num_scored_tokens": total_count,
        "num_windows": num_windows,
        "window_len": config.window_len,
        "kv_cache_dtype": llm.engine.config.kv_cache_dtype,
        "predictions": predictions,  # greedy (top-1) token after each scored position
    }


def top1_agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Share of positions where two runs over the same windows predict the same next token
    (teacher-forced: both see the true text, so one difference does not derail the rest)."""
    pairs = list(zip(a["predictions"], b["predictions"], strict=True))
    return float(sum(x == y for x, y in pairs) / len(pairs))


def _score(output: RequestOutput) -> tuple[float, list[int]]:
    """Sum of NLL of a window's prompt tokens 1.., and the top-1 token before each."""
    assert output.prompt_logprobs is not None, "requested with prompt_logprobs=1"
    nll = 0.0
    top1: list[int] = []
    for token_id, candidates in zip(
        output.prompt_token_ids[1:], output.prompt_logprobs[1:], strict=True
    ):
        assert candidates is not None, "every prompt token after the first is scored"
        nll -= candidates[token_id].logprob
        top1.append(next(t for t, logprob in candidates.items() if logprob.rank == 1))
    return nll, top1
