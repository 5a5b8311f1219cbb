"""`kvserve bench tiers` and `kvserve bench trace-tiers` end to end on a tiny model (CPU and
disk tiers; no speed asserts): the records hold what they promise and every place reports the
hits it got."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_bench_cli import run_bench


@pytest.fixture(scope="module")
def tiny(make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("bench_tiers_model")
    return str(make_tiny_checkpoint("llama", root, max_position_embeddings=1024))


def test_bench_tiers_reports_hits_per_place(tiny: str, tmp_path: Path) -> None:
    plot = tmp_path / "tiers.png"
    record = run_bench(
        ["tiers", "--model", tiny, "--lengths", "16,40", "--suffix-len", "5", "--repeats", "2",
         "--plot", str(plot)],
        tmp_path,
    )  # fmt: skip
    results = record["results"]
    assert results["lengths"] == [16, 32]  # 40 rounds down to whole blocks
    assert results["places"] == ["recompute", "pool", "cpu", "disk"]
    assert results["redis"] is None
    assert results["served"] == {"recompute": True, "pool": True, "cpu": True, "disk": True}
    assert set(results["crossover"]) == {"cpu", "disk"}
    for row in results["rows"]:
        assert row["prompt_len"] == row["prefix_len"] + 5
        cells = row["places"]
        assert cells["recompute"]["cached_tokens"] == 0
        for place in ("pool", "cpu", "disk"):
            assert cells[place]["cached_tokens"] == row["prefix_len"]
        for cell in cells.values():
            assert len(cell["ttft_ms_all"]) == 2
            assert cell["ttft_ms"] > 0 and cell["speedup"] > 0
    assert plot.stat().st_size > 0


# Two conversations, two turns each, whole 512-token blocks (16 tokens at 1/32): with every
# block kept, turns 2 hit 48 of 64 tokens, and conversation 2 hits the shared block 0.
TRACE = [
    {"timestamp": 0, "input_length": 1536, "output_length": 32, "hash_ids": [0, 1, 2]},
    {"timestamp": 10, "input_length": 1536, "output_length": 32, "hash_ids": [0, 5, 6]},
    {"timestamp": 20, "input_length": 2048, "output_length": 32, "hash_ids": [0, 1, 2, 3]},
    {"timestamp": 30, "input_length": 2048, "output_length": 32, "hash_ids": [0, 5, 6, 7]},
]
ALL_REUSED = (16 + 48 + 48) / (48 + 48 + 64 + 64)


def trace_tiers(tiny: str, tmp_path: Path, *flags: str) -> dict[str, Any]:
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in TRACE))
    args = ["trace-tiers", str(trace), "--model", tiny, "--sample-conversations", "1",
            "--kv-restore", "always", "--cpu-blocks", "64", "--disk-blocks", "64",
            *flags]  # fmt: skip
    results: dict[str, Any] = run_bench(args, tmp_path)["results"]
    assert [row["config"] for row in results["rows"]] == ["pool", "cpu", "disk"]
    assert results["workload"]["num_requests"] == 4
    return results


def test_trace_tiers_with_a_large_pool_hits_all_reuse_in_every_config(
    tiny: str, tmp_path: Path
) -> None:
    results = trace_tiers(tiny, tmp_path, "--max-model-len", "1024", "--num-kv-blocks", "100")
    for row in results["rows"]:
        assert row["engine"]["token_hit_ratio"] == pytest.approx(ALL_REUSED)
        assert row["sim"]["token_hit_ratio"] == pytest.approx(ALL_REUSED)
        assert sum(row["engine"]["tier_hit_blocks"].values()) == 0  # the pool served it all
        assert row["engine"]["p99_ttft_ms"] >= row["engine"]["mean_ttft_ms"] > 0


def test_trace_tiers_with_a_small_pool_restores_from_the_tiers(tiny: str, tmp_path: Path) -> None:
    results = trace_tiers(tiny, tmp_path, "--max-model-len", "80", "--num-kv-blocks", "6")
    pool, cpu, disk = results["rows"]
    assert pool["engine"]["token_hit_ratio"] < ALL_REUSED
    assert pool["sim"]["token_hit_ratio"] < ALL_REUSED
    for row in (cpu, disk):
        assert row["engine"]["token_hit_ratio"] == pytest.approx(ALL_REUSED)
        assert row["engine"]["tier_hit_blocks"]["cpu"] > 0
        assert row["sim"]["token_hit_ratio"] == pytest.approx(ALL_REUSED)
