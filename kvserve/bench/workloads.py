"""Benchmark workloads and the arithmetic of their results (pure Python, no torch).

- Seeded random prompts of token ids. String seeds go through sha512 in `random.Random`, so the
  same key gives the same prompt in every process (unlike the salted `hash()`).
- Left padding for the transformers batch baseline.
- Timings of one streamed generation (`DecodeTiming`) and mean / median / p99 summaries with
  vLLM bench names (`mean_ttft_ms`, `median_tpot_ms`, `p99_itl_ms`, ...).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Any, NamedTuple


def prompt_lengths(num_prompts: int, min_len: int, max_len: int, seed: int) -> list[int]:
    """`num_prompts` lengths uniform in [min_len, max_len], fixed by `seed`."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts: must be >= 1, got {num_prompts}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"min_input_len: need 1 <= min <= max, got {min_len} and {max_len}")
    rng = random.Random(seed)
    return [rng.randint(min_len, max_len) for _ in range(num_prompts)]


def token_space(llm: Any) -> tuple[int, frozenset[int]]:
    """Token ids a random prompt may use for an `LLM`: its vocabulary without special tokens."""
    vocab_size = llm.engine.model_config.vocab_size
    tokenizer = llm.tokenizer
    if tokenizer is None:
        return vocab_size, frozenset()
    return min(vocab_size, len(tokenizer)), frozenset(tokenizer.all_special_ids)


def loguniform_lengths(num: int, min_len: int, max_len: int, seed: int) -> list[int]:
    """`num` lengths log-uniform in [min_len, max_len] (as many in 64-128 as in 512-1024),
    fixed by `seed`: the skew toward short requests of real chat traffic."""
    if num < 1:
        raise ValueError(f"num_requests: must be >= 1, got {num}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"length range: need 1 <= min <= max, got {min_len} and {max_len}")
    rng = random.Random(seed)
    low, high = math.log(min_len), math.log(max_len + 1)
    return [min(max_len, int(math.exp(rng.uniform(low, high)))) for _ in range(num)]


def random_token_ids(
    length: int, vocab_size: int, key: str, exclude: frozenset[int] = frozenset()
) -> list[int]:
    """`length` token ids in [0, vocab_size) minus `exclude` (special tokens), fixed by `key`.

    Give every prompt that must not share a prefix with another its own key: prompts made
    from the same key share their leading tokens, and the prefix cache would reuse them.
    """
    rng = random.Random(key)
    return [_draw(rng, vocab_size, exclude) for _ in range(length)]


def random_prompts(
    lengths: Sequence[int], vocab_size: int, key: str, exclude: frozenset[int] = frozenset()
) -> list[list[int]]:
    """One random prompt per length, all drawn from one stream fixed by `key`."""
    rng = random.Random(key)
    return [[_draw(rng, vocab_size, exclude) for _ in range(n)] for n in lengths]


def _draw(rng: random.Random, vocab_size: int, exclude: frozenset[int]) -> int:
    if len(exclude) >= vocab_size:
        raise ValueError("vocab_size: every token id is excluded")
    while True:
        token_id = rng.randrange(vocab_size)
        if token_id not in exclude:
            return token_id


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad a batch to its longest prompt: (input_ids, attention_mask), as HF expects."""
    width = max(len(p) for p in prompts)
    input_ids = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return input_ids, mask


# ---- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("values: need at least one value")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(name: str, values: Sequence[float]) -> dict[str, float]:
    """`{"mean_<name>", "median_<name>", "p99_<name>"}`, vLLM bench spelling."""
    return {
        f"mean_{name}": statistics.fmean(values),
        f"median_{name}": statistics.median(values),
        f"p99_{name}": percentile(values, 99.0),
    }


class DecodeTiming(NamedTuple):
    """One batch-1 generation, in seconds.

    start ---- ttft ----> token 1 ---- decode (n - 1 tokens) ----> token n
    """

    ttft_s: float
    decode_s: float
    e2e_s: float
    num_tokens: int
    itl_s: list[float]  # gaps between consecutive tokens

    @property
    def decode_tok_s(self) -> float:
        return (self.num_tokens - 1) / self.decode_s if self.decode_s > 0 else math.nan

    @property
    def tpot_s(self) -> float:
        return self.decode_s / (self.num_tokens - 1) if self.num_tokens > 1 else math.nan


def decode_timing(start: float, token_times: Sequence[float]) -> DecodeTiming:
    """Timing from the start time and the time each output token appeared."""
    if not token_times:
        raise ValueError("token_times: the generation produced no token")
    gaps = [b - a for a, b in zip(token_times, token_times[1:], strict=False)]
    return DecodeTiming(
        ttft_s=token_times[0] - start,
        decode_s=token_times[-1] - token_times[0],
        e2e_s=token_times[-1] - start,
        num_tokens=len(token_times),
        itl_s=gaps,
    )


def summarize_decode(timings: Sequence[DecodeTiming]) -> dict[str, float]:
    """Medians over iterations (decode tok/s, e2e) plus ttft / tpot / itl summaries in ms."""
    itl = [gap for t in timings for gap in t.itl_s] or [math.nan]
    return {
        "median_decode_tok_s": statistics.median(t.decode_tok_s for t in timings),
        "median_e2e_latency_s": statistics.median(t.e2e_s for t in timings),
        "num_output_tokens": timings[0].num_tokens,
        **summarize("ttft_ms", [t.ttft_s * 1e3 for t in timings]),
        **summarize("tpot_ms", [t.tpot_s * 1e3 for t in timings]),
        **summarize("itl_ms", [gap * 1e3 for gap in itl]),
    }


def throughput_metrics(
    elapsed_s: float, num_requests: int, num_input_tokens: int, num_output_tokens: int
) -> dict[str, float]:
    """vLLM bench's throughput fields for one run."""
    return {
        "elapsed_time": elapsed_s,
        "num_requests": num_requests,
        "total_input_tokens": num_input_tokens,
        "total_output_tokens": num_output_tokens,
        "request_throughput": num_requests / elapsed_s,
        "output_throughput": num_output_tokens / elapsed_s,
        "total_token_throughput": (num_input_tokens + num_output_tokens) / elapsed_s,
    }


class RequestTimes(NamedTuple):
    """When one request arrived, got its first token and finished (one clock, seconds)."""

    arrival: float
    first_token: float
    finished: float
    num_output_tokens: int


def request_latencies(requests: Sequence[RequestTimes]) -> dict[str, float]:
    """ttft / tpot / e2el summaries in ms over requests (tpot excludes the first token)."""
    tpot = [
        (r.finished - r.first_token) / (r.num_output_tokens - 1)
        for r in requests
        if r.num_output_tokens > 1
    ] or [math.nan]
    return {
        **summarize("ttft_ms", [(r.first_token - r.arrival) * 1e3 for r in requests]),
        **summarize("tpot_ms", [t * 1e3 for t in tpot]),
        **summarize("e2el_ms", [(r.finished - r.arrival) * 1e3 for r in requests]),
    }


def request_times(outputs: Sequence[Any]) -> list[RequestTimes]:
    """`RequestTimes` of finished `RequestOutput`s that carry metrics."""
    return [
        RequestTimes(
            m.arrival_time, m.first_token_time, m.finished_time, len(o.outputs[0].token_ids)
        )
        for o in outputs
        if (m := o.metrics) is not None and m.first_token_time and m.finished_time
    ]


def median_runs(runs: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The median of every metric over iterations, plus the iterations themselves."""
    medians = {key: _median([run[key] for run in runs]) for key in runs[0]}
    return {**medians, "num_iters": len(runs), "iterations": list(runs)}


def _median(values: list[float]) -> float:
    """The median; of counts (ints), the lower middle value, so it stays a count."""
    if all(isinstance(v, int) for v in values):
        return statistics.median_low(values)
    return statistics.median(values)


def agreeing_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two generations share."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
