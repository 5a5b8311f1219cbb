"""Serving-bench workloads: arrivals, trace replay that keeps prefix reuse, exact metrics."""

from __future__ import annotations

import math
import statistics

import pytest

from kvserve.bench import serve_workload as sw
from kvserve.bench.serve_report import RequestResult, compute_metrics
from kvserve.trace.records import TraceRecord

SPACE = sw.TokenSpace(1000, frozenset({0, 1, 2}))


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate() -> None:
    times = sw.poisson_arrivals(4000, 20.0, seed=3)
    assert times == sw.poisson_arrivals(4000, 20.0, seed=3)
    assert times != sw.poisson_arrivals(4000, 20.0, seed=4)
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 20.0, rel=0.05)
    assert sw.poisson_arrivals(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="request_rate"):
        sw.poisson_arrivals(3, 0.0, seed=0)


def test_random_requests_share_no_prefix_and_avoid_special_tokens() -> None:
    requests = sw.random_requests(5, 12, 3, math.inf, SPACE, seed=0)
    assert [len(r.prompt_token_ids) for r in requests] == [12] * 5
    assert len({r.prompt_token_ids[0] for r in requests}) > 1
    assert all(t not in SPACE.exclude for r in requests for t in r.prompt_token_ids)
    with pytest.raises(ValueError, match="input_len"):
        sw.random_requests(5, 0, 3, math.inf, SPACE, seed=0)


def test_long_prompts_arrive_on_their_schedule() -> None:
    longs = sw.long_prompt_requests(3, 100, 1, 2.0, 4.0, SPACE, seed=0)
    assert [r.arrival_s for r in longs] == [2.0, 6.0, 10.0]
    assert {r.tag for r in longs} == {"long"} and len(longs[0].prompt_token_ids) == 100


def record(line: int, ts: float, n_in: int, n_out: int, ids: list[int]) -> TraceRecord:
    return TraceRecord(line, ts, n_in, n_out, tuple(ids))


def test_trace_replay_maps_equal_hash_ids_to_equal_tokens() -> None:
    replay = sw.TraceReplay(SPACE, time_scale=0.5, length_scale=1 / 32)  # 16 tokens per id
    records = [
        record(1, 1000, 1300, 64, [0, 7, 9]),  # 1300 / 32 = 40.6 -> 41 tokens; 64 / 32 = 2
        record(2, 3000, 1024, 10, [0, 7]),  # same first two blocks
        record(3, 5000, 512, 10, [5]),  # 10 / 32 rounds to 0 -> at least 1
    ]
    first, second, third = replay.requests(records)
    assert len(first.prompt_token_ids) == 41 and first.max_tokens == 2
    assert second.prompt_token_ids == first.prompt_token_ids[:32]
    assert first.prompt_token_ids[32:] == replay.prompt(record(9, 0, 512, 1, [9]))[:9]
    assert third.prompt_token_ids[:16] != first.prompt_token_ids[:16] and third.max_tokens == 1
    assert [r.arrival_s for r in (first, second, third)] == [0.0, 1.0, 2.0]  # (ts - 1000)/1000*0.5
    assert replay.block_tokens == 16


def test_trace_replay_drops_requests_that_do_not_fit_and_counts_them() -> None:
    replay = sw.TraceReplay(SPACE, length_scale=1 / 32, max_model_len=40)
    records = [record(1, 0, 1024, 32, [0, 1]), record(2, 1, 2048, 32, [0, 1, 2, 3])]
    kept = list(replay.requests(records))
    assert len(kept) == 1 and replay.num_too_long == 1  # 64 + 1 tokens > 40
    assert len(list(sw.TraceReplay(SPACE).requests(records * 3, max_requests=2))) == 2
    with pytest.raises(ValueError, match="length_scale"):
        sw.TraceReplay(SPACE, length_scale=1 / 1024)
    with pytest.raises(ValueError, match="time_scale"):
        sw.TraceReplay(SPACE, time_scale=0)


def result(tag: str, sent: float, times: list[float], n_out: int, ok: bool = True) -> RequestResult:
    return RequestResult(tag, sent, ok, "" if ok else "HTTP 500: x", 10, n_out, 4, times)


def test_metrics_are_exact_on_hand_made_results() -> None:
    results = [
        result("a", 0.0, [0.1, 0.2, 0.4], 3),  # ttft 100, itl 100 200, tpot 150, e2el 400
        result("a", 1.0, [1.3, 1.4], 2),  # ttft 300, itl 100, tpot 100, e2el 400
        result("b", 2.0, [2.5], 1),  # ttft 500, no gaps, no tpot
        result("b", 3.0, [], 0, ok=False),
    ]
    metrics = compute_metrics(results, duration_s=4.0, slo_ttft_ms=350.0, slo_tpot_ms=120.0)
    assert metrics["completed"] == 3 and metrics["failed"] == 1
    assert metrics["first_errors"] == ["HTTP 500: x"]
    assert metrics["mean_ttft_ms"] == pytest.approx(300.0)
    assert metrics["median_ttft_ms"] == pytest.approx(300.0)
    assert metrics["mean_itl_ms"] == pytest.approx(400.0 / 3)
    assert metrics["mean_tpot_ms"] == pytest.approx(125.0)
    assert metrics["mean_e2el_ms"] == pytest.approx(1300.0 / 3)
    assert metrics["total_output_tokens"] == 6 and metrics["output_throughput"] == 1.5
    assert metrics["cached_token_ratio"] == pytest.approx(12 / 30)
    # SLO: only the second meets ttft <= 350 and tpot <= 120 (the third has no tpot)
    assert metrics["good_requests"] == 1 and metrics["goodput"] == 0.25
    assert metrics["by_tag"]["a"]["completed"] == 2 and metrics["by_tag"]["b"]["failed"] == 1
    assert metrics["by_tag"]["a"]["p99_itl_ms"] == pytest.approx(198.0)
