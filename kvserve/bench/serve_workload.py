"""Request streams for `kvserve bench serve`: random arrivals, long prompts among decodes,
and Mooncake trace replay (pure Python, no torch).

Every prompt is token ids, so the server tokenizes nothing and the prefix cache sees exactly
the reuse the workload intends. A trace carries only hash ids, one per 512-token block; the
replay scales lengths by `length_scale` (512 tokens -> 512 * length_scale tokens per id) and
maps each id to a fixed pseudo-random block of tokens, so equal ids give equal tokens and a
trace's prefix reuse survives:

    trace:   hash_ids [0, 7, 9]  input_length 1300      (blocks of 512, last one partial)
    scaled:  [ tok(0) 16 | tok(7) 16 | tok(9)[:9] ]      length_scale 1/32: 41 tokens
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from kvserve.bench.workloads import random_token_ids
from kvserve.trace.records import TRACE_BLOCK_TOKENS, TraceRecord


class BenchRequest(NamedTuple):
    arrival_s: float  # when to send it, from the start of the run
    prompt_token_ids: list[int]
    max_tokens: int
    tag: str  # the class it is reported under ("random", "long", "trace", ...)


class TokenSpace(NamedTuple):
    """The ids random prompts draw from: [0, vocab_size) minus special tokens."""

    vocab_size: int
    exclude: frozenset[int] = frozenset()


def poisson_arrivals(num: int, request_rate: float, seed: int) -> list[float]:
    """Arrival times of a Poisson process at `request_rate` per second; inf: all at 0."""
    if num < 1:
        raise ValueError(f"num_prompts: must be >= 1, got {num}")
    if not request_rate > 0:
        raise ValueError(f"request_rate: must be > 0 (inf for all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(f"arrivals-{seed}")
    times, now = [], 0.0
    for _ in range(num):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    request_rate: float,
    space: TokenSpace,
    seed: int,
    tag: str = "random",
) -> list[BenchRequest]:
    """`num` prompts of `input_len` random tokens (no shared prefixes), Poisson arrivals."""
    _require_positive("input_len", input_len)
    _require_positive("output_len", output_len)
    return [
        BenchRequest(
            arrival,
            random_token_ids(input_len, space.vocab_size, f"{tag}-{seed}-{i}", space.exclude),
            output_len,
            tag,
        )
        for i, arrival in enumerate(poisson_arrivals(num, request_rate, seed))
    ]


def long_prompt_requests(
    num: int, input_len: int, output_len: int, start_s: float, interval_s: float,
    space: TokenSpace, seed: int,
) -> list[BenchRequest]:  # fmt: skip
    """`num` long prompts tagged "long", the first at `start_s`, then every `interval_s`:
    the prefills that stall running decodes when a step takes a whole prompt."""
    if num < 0:
        raise ValueError(f"num_long_prompts: must be >= 0, got {num}")
    _require_positive("long_input_len", input_len)
    _require_positive("long_output_len", output_len)
    if start_s < 0 or interval_s < 0:
        raise ValueError("long_prompt_start / long_prompt_interval: must be >= 0 seconds")
    return [
        BenchRequest(
            start_s + i * interval_s,
            random_token_ids(input_len, space.vocab_size, f"long-{seed}-{i}", space.exclude),
            output_len,
            "long",
        )
        for i in range(num)
    ]


class TraceReplay:
    """Scaled requests from trace records, streaming; counts what it had to drop.

    A request whose scaled prompt + output exceeds `max_model_len` is dropped (counted in
    `num_too_long`), not cut: cutting would change what the rest of its chain reuses.
    """

    def __init__(
        self,
        space: TokenSpace,
        time_scale: float = 1.0,
        length_scale: float = 1 / 32,
        max_model_len: int | None = None,
        seed: int = 0,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale: must be > 0, got {time_scale}")
        block_tokens = round(TRACE_BLOCK_TOKENS * length_scale)
        if block_tokens < 1 or length_scale > 1:
            raise ValueError(
                f"length_scale: must make a {TRACE_BLOCK_TOKENS}-token block 1 to "
                f"{TRACE_BLOCK_TOKENS} tokens, got {length_scale}"
            )
        self.space = space
        self.time_scale = time_scale
        self.block_tokens = block_tokens
        self.max_model_len = max_model_len
        self.seed = seed
        self.num_too_long = 0
        self._blocks: dict[int, list[int]] = {}

    def scaled_lengths(self, record: TraceRecord) -> tuple[int, int]:
        """(prompt tokens, output tokens) after scaling; each at least 1."""
        scale = self.block_tokens / TRACE_BLOCK_TOKENS
        return max(1, round(record.input_length * scale)), max(
            1, round(record.output_length * scale)
        )

    def prompt(self, record: TraceRecord) -> list[int]:
        """The record's scaled prompt: each hash id's token block, the last one cut short."""
        num_tokens, _ = self.scaled_lengths(record)
        tokens: list[int] = []
        for hash_id in record.hash_ids:
            tokens.extend(self._block(hash_id))
            if len(tokens) >= num_tokens:
                break
        return tokens[:num_tokens]

    def requests(self, records: Iterable[TraceRecord], max_requests: int | None = None
                 ) -> Iterator[BenchRequest]:  # fmt: skip
        """Arrivals relative to the first record, times `time_scale`."""
        start: float | None = None
        count = 0
        for record in records:
            if max_requests is not None and count >= max_requests:
                return
            start = record.timestamp_ms if start is None else start
            num_tokens, num_output = self.scaled_lengths(record)
            if self.max_model_len is not None and num_tokens + num_output > self.max_model_len:
                self.num_too_long += 1
                continue
            arrival = (record.timestamp_ms - start) / 1000.0 * self.time_scale
            yield BenchRequest(arrival, self.prompt(record), num_output, "trace")
            count += 1

    def _block(self, hash_id: int) -> list[int]:
        block = self._blocks.get(hash_id)
        if block is None:
            key = f"trace-{self.seed}-{hash_id}"
            block = random_token_ids(
                self.block_tokens, self.space.vocab_size, key, self.space.exclude
            )
            self._blocks[hash_id] = block
        return block


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
