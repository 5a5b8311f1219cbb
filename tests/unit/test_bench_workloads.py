"""Benchmark workloads and statistics: seeded, exact, fast (no model, no torch)."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from kvserve.bench import workloads as wl


def test_prompt_lengths_are_seeded_and_in_range() -> None:
    lengths = wl.prompt_lengths(200, 32, 512, seed=0)
    assert lengths == wl.prompt_lengths(200, 32, 512, seed=0)
    assert lengths != wl.prompt_lengths(200, 32, 512, seed=1)
    assert all(32 <= n <= 512 for n in lengths)
    assert min(lengths) < 100 and max(lengths) > 450  # spread over the range
    assert wl.prompt_lengths(3, 7, 7, seed=5) == [7, 7, 7]


@pytest.mark.parametrize(("num", "low", "high"), [(0, 1, 2), (4, 0, 8), (4, 9, 8)])
def test_prompt_lengths_reject(num: int, low: int, high: int) -> None:
    with pytest.raises(ValueError):
        wl.prompt_lengths(num, low, high, seed=0)


def test_random_prompts_same_across_processes() -> None:
    """String keys go through sha512, so another interpreter (other hash salt) agrees."""
    here = wl.random_token_ids(8, 1000, "latency:0:0")
    code = (
        "from kvserve.bench.workloads import random_token_ids;"
        "print(random_token_ids(8, 1000, 'latency:0:0'))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert there.strip() == str(here)


def test_random_prompts_lengths_keys_and_exclusions() -> None:
    exclude = frozenset(range(10))
    prompts = wl.random_prompts([3, 5, 1], 50, "throughput:0:0", exclude)
    assert [len(p) for p in prompts] == [3, 5, 1]
    assert all(10 <= t < 50 for p in prompts for t in p)
    assert prompts == wl.random_prompts([3, 5, 1], 50, "throughput:0:0", exclude)
    assert prompts != wl.random_prompts([3, 5, 1], 50, "throughput:1:0", exclude)
    with pytest.raises(ValueError, match="vocab_size"):
        wl.random_token_ids(1, 4, "k", frozenset(range(4)))


def test_left_pad() -> None:
    ids, mask = wl.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids == [[5, 6, 7], [0, 0, 8]]
    assert mask == [[1, 1, 1], [0, 0, 1]]


def test_percentile_matches_linear_interpolation() -> None:
    assert wl.percentile([3.0], 99) == 3.0
    assert wl.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert wl.percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert math.isclose(wl.percentile(list(map(float, range(101))), 99), 99.0)
    assert wl.summarize("ttft_ms", [1.0, 2.0, 6.0]) == {
        "mean_ttft_ms": 3.0,
        "median_ttft_ms": 2.0,
        "p99_ttft_ms": pytest.approx(5.92),
    }


def test_decode_timing() -> None:
    timing = wl.decode_timing(10.0, [10.5, 10.6, 10.8, 11.0])
    assert timing.ttft_s == pytest.approx(0.5)
    assert timing.decode_s == pytest.approx(0.5)
    assert timing.e2e_s == pytest.approx(1.0)
    assert timing.decode_tok_s == pytest.approx(6.0)  # 3 tokens after the first in 0.5 s
    assert timing.tpot_s == pytest.approx(0.5 / 3)
    assert timing.itl_s == pytest.approx([0.1, 0.2, 0.2])
    summary = wl.summarize_decode([timing, wl.decode_timing(0.0, [1.0, 2.0, 3.0, 4.0])])
    assert summary["median_decode_tok_s"] == pytest.approx((6.0 + 1.0) / 2)
    assert summary["median_ttft_ms"] == pytest.approx(750.0)
    assert summary["num_output_tokens"] == 4
    with pytest.raises(ValueError):
        wl.decode_timing(0.0, [])


def test_throughput_and_request_latencies() -> None:
    metrics = wl.throughput_metrics(2.0, 4, 100, 60)
    assert metrics["request_throughput"] == 2.0
    assert metrics["output_throughput"] == 30.0
    assert metrics["total_token_throughput"] == 80.0
    outputs = [
        SimpleNamespace(
            metrics=SimpleNamespace(arrival_time=1.0, first_token_time=1.5, finished_time=3.5),
            outputs=[SimpleNamespace(token_ids=[7] * 5)],
        ),
        SimpleNamespace(metrics=None, outputs=[]),
    ]
    latencies = wl.request_latencies(wl.request_times(outputs))
    assert latencies["median_ttft_ms"] == pytest.approx(500.0)
    assert latencies["median_tpot_ms"] == pytest.approx(500.0)  # 2 s over 4 tokens
    assert latencies["median_e2el_ms"] == pytest.approx(2500.0)


def test_median_runs_and_agreeing_prefix() -> None:
    runs = [{"output_throughput": v} for v in (3.0, 1.0, 2.0)]
    assert wl.median_runs(runs) == {"output_throughput": 2.0, "num_iters": 3, "iterations": runs}
    counts = wl.median_runs([{"num_requests": 4}, {"num_requests": 4}])
    assert counts["num_requests"] == 4 and isinstance(counts["num_requests"], int)
    assert wl.agreeing_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert wl.agreeing_prefix([1, 2], [1, 2, 3]) == 2


def test_loguniform_lengths_are_in_range_skewed_short_and_fixed_by_seed() -> None:
    lengths = wl.loguniform_lengths(2000, 64, 1024, seed=3)
    assert lengths == wl.loguniform_lengths(2000, 64, 1024, seed=3)
    assert min(lengths) >= 64 and max(lengths) <= 1024
    short = sum(1 for n in lengths if n < 128)
    long = sum(1 for n in lengths if n >= 512)
    assert abs(short - long) < 200  # one octave each: equally likely
    assert sum(lengths) / len(lengths) < (64 + 1024) / 2
    with pytest.raises(ValueError, match="num_requests"):
        wl.loguniform_lengths(0, 1, 2, seed=0)
