"""`kvserve trace simulate`: hand-computed hit ratios per policy, holding, tiers, CLI.

Every request's sim tokens are its hash ids plus one fresh output block (output_length <=
512), all cached by the engine's pool. Block ids below are the pool's (b1 ... b5).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvserve.cli import main
from kvserve.kv.block_hash import hash_block
from kvserve.sim.replay import Replay, TraceScan, next_accesses, scan_trace, simulate
from kvserve.sim.results import CostModel
from kvserve.sim.tiers import TierSpec, parse_tiers
from kvserve.trace.records import TraceReader, TraceRecord
from kvserve.trace.stats import collect

INSTANT = CostModel(prefill_tokens_per_s=1e15, decode_ms_per_token=0.0)


def rec(t: float, ids: list[int], input_length: int | None = None, out: int = 1) -> TraceRecord:
    length = 512 * len(ids) if input_length is None else input_length
    return TraceRecord(0, t * 1000.0, length, out, tuple(ids))


def replay(records: list[TraceRecord], capacity: int, policy: str, **kwargs: object) -> Replay:
    scan = scan_trace(records)
    sim = Replay(capacity, policy, kwargs.pop("cost", INSTANT), scan, **kwargs)  # type: ignore[arg-type]
    sim.run(records)
    sim.manager.check_invariants()
    assert sim.manager.num_used_blocks == 0  # every request freed its blocks
    return sim


# r0 [1] takes b1, b2(o); r1 [2] b3, b4(o); r2 [1] hits b1, takes b5(o);
# r3 [3] and r4 [4] need two blocks each; r5 [2] hits only if [2] (b3) survived.
# lru: r3 evicts o0, o1; r4 evicts [2] and o2 -> r5 misses.      hits r2      = 1 of 6
# fifo (by birth b1..b5): r3 evicts [1], o0; r4 evicts [2], o1.   hits r2      = 1 of 6
# lfu (b1 has 1 hit, ties least recently freed): r3 evicts o0, o1; r4 evicts [2], o2.  1 of 6
# belady ([2] is used by r5, the rest never again): keeps [2].    hits r2, r5  = 2 of 6
SIX = [rec(0, [1]), rec(1, [2]), rec(2, [1]), rec(3, [3]), rec(4, [4]), rec(5, [2])]


@pytest.mark.parametrize(("policy", "hits"), [("lru", 1), ("fifo", 1), ("lfu", 1), ("belady", 2)])
def test_hand_trace_hits_per_policy(policy: str, hits: int) -> None:
    sim = replay(SIX, 5, policy)
    assert (sim.result.hit_blocks, sim.result.prompt_blocks) == (hits, 6)
    assert sim.result.hit_tokens == 512 * hits


def test_hand_trace_capacity_decides() -> None:
    # capacity 12 holds all 12 sim blocks: every repeat hits (r2 and r5), for every policy
    for policy in ("lru", "fifo", "lfu", "belady"):
        assert replay(SIX, 12, policy).result.hit_blocks == 2
    # capacity 2: each request evicts everything the previous one left -> no hits at all
    for policy in ("lru", "fifo", "lfu", "belady"):
        sim = replay(SIX, 2, policy)
        assert sim.result.hit_blocks == 0 and sim.result.evictions == 10


def test_ties_never_used_blocks_go_least_recently_freed_first() -> None:
    # capacity 4. r0 [1, 2] takes b1 [1], b2 [1,2], b3 o0 and frees b3, b2, b1 (tail first).
    # r1 [5] needs 2 blocks: b4 (never used) and one eviction. For belady all three cached
    # blocks are never used again (a tie): the least recently freed goes, o0. lfu (all 0
    # hits) ties the same way; fifo evicts the earliest computed, [1].
    trace = [rec(0, [1, 2]), rec(1, [5])]
    prefix = chain([1, 2])
    for policy, survivors in [("belady", [1, 1]), ("lfu", [1, 1]), ("fifo", [0, 1])]:
        pool = replay(trace, 4, policy).manager.pool
        kept = [int(pool.get_cached_block(h) is not None) for h in prefix]
        assert kept == survivors, policy
        assert pool.num_evictions == 1


def chain(ids: list[int]) -> list[bytes]:
    """The engine's block hashes of a run of sim tokens (block_size 1, no extra keys)."""
    hashes: list[bytes] = []
    for token in ids:
        hashes.append(hash_block(hashes[-1] if hashes else None, [token]))
    return hashes


def test_prefix_stops_at_first_miss_and_tokens_count_partial_blocks() -> None:
    # r1 shares [1, 2] (2nd block 188 tokens), r2 = [9, 2]: a different chain, no hit
    trace = [rec(0, [1, 2], 700), rec(1, [1, 2], 700), rec(2, [9, 2], 600)]
    sim = replay(trace, 50, "lru")
    assert sim.result.hit_blocks == 2 and sim.result.hit_tokens == 700
    assert sim.result.prompt_tokens == 2000


def test_belady_links_skip_a_rejected_request() -> None:
    # capacity 4: r3 (5 blocks + output) is rejected, so [10] and [10, 11] are never used
    # again; r2 must evict them, not [6], which r4 then hits
    trace = [rec(0, [10, 11]), rec(1, [6]), rec(2, [1]), rec(3, [10, 11, 12, 13, 14]), rec(4, [6])]
    assert replay(trace, 4, "belady").result.hit_blocks == 1
    assert replay(trace, 4, "lru").result.hit_blocks == 1


def test_a_request_larger_than_the_cache_is_rejected_and_counted_as_misses() -> None:
    trace = [rec(0, [1, 2]), rec(1, [3, 4, 5, 6, 7]), rec(2, [1, 2])]
    sim = replay(trace, 5, "lru")  # request 1 needs 5 + 1 output blocks > 5
    assert sim.result.num_rejected == 1
    assert (sim.result.hit_blocks, sim.result.prompt_blocks) == (2, 9)
    assert sim.result.evictions == 0  # the rejected request took nothing


def test_requests_hold_their_blocks_and_wait_first_come_first_served() -> None:
    # 1 s per output token, instant prefill. r0 holds 3 of 5 blocks until t=10; r1 (3 blocks)
    # waits 9 s; r2 hits [1, 2] (held free by then) but queues behind r1 until r1 ends (t=20).
    slow = CostModel(prefill_tokens_per_s=1e15, decode_ms_per_token=1000.0)
    trace = [rec(0, [1, 2], out=10), rec(1, [3, 4], out=10), rec(2, [1, 2], out=10)]
    sim = replay(trace, 5, "lru", cost=slow)
    assert sim.result.queue_wait_s == pytest.approx([0.0, 9.0, 18.0])
    assert sim.result.hit_blocks == 2
    assert sim.result.peak_used_blocks == 3  # never two requests at once: 3 + 3 > 5


def test_a_request_ending_as_another_arrives_frees_its_blocks_first() -> None:
    # 10 output tokens at 0.1 s each: r0 ends at exactly t=1.0, when r1 needs the whole cache
    cost = CostModel(prefill_tokens_per_s=1e15, decode_ms_per_token=100.0)
    trace = [rec(0, [1, 2, 3], out=10), rec(1, [4, 5, 6])]
    sim = replay(trace, 4, "lru", cost=cost)
    assert sim.result.queue_wait_s == [0.0, 0.0]


def test_requests_admitted_together_finish_together() -> None:
    # r0 fills the cache until t=10; r1 and r2 wait, start together at 10, end together at 20
    slow = CostModel(prefill_tokens_per_s=1e15, decode_ms_per_token=1000.0)
    trace = [rec(0, [1, 2, 3, 4], out=10), rec(1, [5], out=10), rec(1, [6], out=10)]
    sim = replay(trace, 5, "lru", cost=slow)
    assert sim.result.queue_wait_s == pytest.approx([0.0, 9.0, 9.0])
    assert sim.result.peak_used_blocks == 5


def test_prefill_time_counts_only_uncached_tokens() -> None:
    # 1000 tok/s prefill: r0 computes 1024 tokens (1.024 s); r1 arrives at 0.5 s while r0 runs
    # and hits [1] (the engine registers a block when it is allocated) -> 512 tokens, 0.512 s
    cost = CostModel(prefill_tokens_per_s=1000.0, decode_ms_per_token=0.0)
    trace = [rec(0, [1, 2]), rec(0.5, [1, 3])]
    sim = replay(trace, 10, "lru", cost=cost)
    assert sim.result.hit_blocks == 1
    assert sim.result.to_dict(cost)["prefill_s_saved"] == pytest.approx(0.512)


def random_trace(seed: int, num_requests: int = 120) -> list[TraceRecord]:
    """Conversations: each request extends an earlier request's chain or starts a new one."""
    rng = random.Random(seed)
    chains: list[list[int]] = []
    next_id = 0
    records = []
    for i in range(num_requests):
        if chains and rng.random() < 0.7:
            base = rng.choice(chains)
            ids = base[: rng.randint(1, len(base))]
        else:
            ids = []
        for _ in range(rng.randint(1, 4)):
            ids = [*ids, next_id]
            next_id += 1
        chains.append(ids)
        records.append(rec(i, ids, out=rng.randint(0, 900)))
    return records


OVERLAPPING = CostModel(prefill_tokens_per_s=2000.0, decode_ms_per_token=5.0)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("cost", [INSTANT, OVERLAPPING], ids=["one-at-a-time", "overlapping"])
def test_belady_is_never_below_another_policy(seed: int, cost: CostModel) -> None:
    """Belady's rule is optimal for one request at a time (the instant cost model). With
    requests overlapping, hits change durations and so timing: no theorem then, but none of
    1,800 + 600 random cases (seeds 0-299 and 0-199, offline) had Belady below another."""
    trace = random_trace(seed)
    for capacity in (6, 8, 20, 60, 150):
        hits = {
            p: replay(trace, capacity, p, cost=cost).result.hit_blocks
            for p in ("lru", "fifo", "lfu")
        }
        belady = replay(trace, capacity, "belady", cost=cost).result.hit_blocks
        assert belady >= max(hits.values()), (capacity, belady, hits)


@pytest.mark.parametrize("seed", range(3))
def test_unbounded_capacity_equals_the_stats_hit_ratio(seed: int) -> None:
    trace = random_trace(seed)
    stats = collect(trace)
    for policy in ("lru", "belady"):
        (result,) = simulate(lambda: trace, [None], [policy], INSTANT)
        assert result["hit_blocks"] == stats.num_hits
        assert result["prefill_tokens_saved"] == stats.num_hit_tokens
        assert result["evictions"] == 0 and result["unbounded"]


def test_next_accesses_link_each_access_to_the_next_run_use_of_its_id() -> None:
    scan = scan_trace([rec(0, [1, 2]), rec(1, [1, 3, 4, 5]), rec(2, [1])])
    assert scan.num_requests == 3 and scan.num_sim_blocks == 7 + 3
    never = float("inf")
    assert list(next_accesses(scan, 10)) == [2.0, never, 6.0, never, never, never, never]
    # at capacity 4 the 5-block request 1 is rejected: request 0's [1] is next used by 2
    assert list(next_accesses(scan, 4))[:2] == [6.0, never]


def test_evicted_blocks_fall_to_lower_tiers_and_are_restored_when_faster() -> None:
    # device: 3 blocks. r1 [5, 6] evicts [1, 2] (and o0) to "cpu"; r2 [1, 2] restores both.
    cost = CostModel(prefill_tokens_per_s=1000.0, decode_ms_per_token=0.0, kv_bytes_per_token=1000)
    cpu = TierSpec("cpu", 10, 1.0)  # 1 GB/s: 512 tokens x 1000 B = 0.512 ms, recompute 0.512 s
    trace = [rec(0, [1, 2]), rec(10, [5, 6]), rec(20, [1, 2])]
    sim = replay(trace, 3, "lru", cost=cost, tiers=[cpu])
    assert sim.result.hit_blocks == 0
    assert sim.result.tier_hit_blocks == {"cpu": 2}
    assert sim.result.tier_saved_s["cpu"] == pytest.approx(2 * (0.512 - 0.000512))
    # a tier slower than recomputing is never used
    slow = TierSpec("disk", 10, 1e-6)
    sim = replay(trace, 3, "lru", cost=cost, tiers=[slow])
    assert sim.result.tier_hit_blocks == {"disk": 0}


def test_lower_tiers_cascade_lru_victims_down() -> None:
    # capacity 4, every request evicts all 4 blocks of the one before (o0, [1,2,3], [1,2],
    # [1] for r1: tail first). cpu keeps the 2 newest, passing its victims to disk (3), which
    # drops the oldest: after r2 evicts o1 [4,5,6] [4,5] [4], cpu holds [4,5] [4] and disk
    # [1] o1 [4,5,6], least recently used first.
    sim = replay(
        [rec(0, [1, 2, 3]), rec(10, [4, 5, 6]), rec(20, [7, 8, 9])],
        4,
        "lru",
        tiers=[TierSpec("cpu", 2, 10.0), TierSpec("disk", 3, 1.0)],
    )
    first, second = chain([1, 2, 3, -1]), chain([4, 5, 6, -2])
    assert sim.lower.contents("cpu") == [second[1], second[0]]
    assert sim.lower.contents("disk") == [first[0], second[3], second[2]]


@pytest.mark.parametrize(
    ("text", "message"),
    [("cpu:10", "name:capacity_blocks"), ("cpu:0:5", "must be > 0"), ("a:1:1,a:2:2", "twice")],
)
def test_bad_tiers_name_the_flag(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"--tiers: .*{message}"):
        parse_tiers(text)


def test_cli_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "timestamp": r.timestamp_ms,
                    "input_length": r.input_length,
                    "output_length": r.output_length,
                    "hash_ids": list(r.hash_ids),
                }
            )
            + "\n"
            for r in random_trace(1, 60)
        )
    )
    png, out = tmp_path / "hit.png", tmp_path / "sim.json"
    argv = ["trace", "simulate", str(path), "--capacity-blocks", "10,40,unbounded"]
    argv += ["--policy", "lru,belady", "--plot", str(png), "--output-json", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert [(r["policy"], r["unbounded"]) for r in report["results"]] == [
        ("lru", False), ("lru", False), ("lru", True),
        ("belady", False), ("belady", False), ("belady", True),
    ]  # fmt: skip
    assert list(report["curves"]) == ["lru", "belady"]
    assert [point[0] for point in report["curves"]["lru"]][:2] == [10, 40]
    unbounded = report["results"][2]["block_hit_ratio"]
    stats = collect(TraceReader(str(path)))
    assert unbounded == stats.num_hits / stats.num_blocks
    assert png.stat().st_size > 1000
    assert main(["trace", "simulate", str(path), "--capacity-blocks", "10"]) == 0
    assert "lru" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--capacity-blocks", "0", "--capacity-blocks"),
        ("--capacity-blocks", "lots", "--capacity-blocks"),
        ("--policy", "mru", "--policy"),
        ("--prefill-tokens-per-s", "0", "prefill_tokens_per_s"),
        ("--tiers", "cpu", "--tiers"),
    ],
)
def test_cli_bad_flags_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n')
    argv = ["trace", "simulate", str(path), "--capacity-blocks", "4", flag, value]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_line_names_the_line_or_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.jsonl"
    good = '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n'
    path.write_text(good + "{oops\n" + good)
    assert main(["trace", "simulate", str(path), "--capacity-blocks", "4"]) == 2
    assert "t.jsonl:2" in capsys.readouterr().err
    argv = ["trace", "simulate", str(path), "--capacity-blocks", "4", "--skip-bad-lines", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_skipped_lines"] == 1 and report["results"][0]["hit_blocks"] == 1


def test_replay_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="capacity_blocks"):
        Replay(0, "lru", INSTANT)
    with pytest.raises(ValueError, match="belady"):
        Replay(4, "belady", INSTANT)
    with pytest.raises(ValueError, match="eviction_policy"):
        Replay(4, "mru", INSTANT, TraceScan())
