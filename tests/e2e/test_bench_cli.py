"""Every `kvserve bench` subcommand runs end to end on a tiny model and writes its JSON record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvserve.cli import main


def run_bench(args: list[str], tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "record.json"
    assert main(["--log-level", "WARNING", "bench", *args, "--output-json", str(out)]) == 0
    record: dict[str, Any] = json.loads(out.read_text())
    return record


@pytest.fixture(scope="module")
def tiny(make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("bench_model")
    return str(make_tiny_checkpoint("llama", root, max_position_embeddings=1024))


def test_bench_latency_with_transformers_and_no_cache(tiny: str, tmp_path: Path) -> None:
    record = run_bench(
        ["latency", "--model", tiny, "--input-len", "8", "--output-len", "4", "--num-iters", "1",
         "--no-cache-lens", "8,16", "--no-cache-output-len", "3", "--compare-transformers",
         "--plot", str(tmp_path / "nc.png")],
        tmp_path,
    )  # fmt: skip
    results = record["results"]
    assert results["kvserve"]["num_output_tokens"] == 4
    assert results["greedy_tokens_agree"] == 4
    assert results["kv_bytes_per_token"]["measured"] == results["kv_bytes_per_token"]["formula"]
    assert [row["prompt_len"] for row in results["no_cache"]] == [8, 16]
    assert (tmp_path / "nc.png").stat().st_size > 0


def test_bench_throughput(tiny: str, tmp_path: Path) -> None:
    record = run_bench(
        ["throughput", "--model", tiny, "--num-prompts", "5", "--min-input-len", "4",
         "--max-input-len", "20", "--output-len", "3", "--num-iters", "1",
         "--compare-transformers", "--hf-batch-size", "2"],
        tmp_path,
    )  # fmt: skip
    assert record["results"]["kvserve"]["total_output_tokens"] == 15
    assert record["results"]["transformers"]["total_output_tokens"] == 15


def test_bench_prefix_reports_hits_equal_to_reusable(tiny: str, tmp_path: Path) -> None:
    record = run_bench(
        ["prefix", "--model", tiny, "--num-requests", "3", "--system-len", "40",
         "--question-len", "5", "--num-turns", "3", "--message-len", "10", "--output-len", "4",
         "--plot", str(tmp_path / "p.png")],
        tmp_path,
    )  # fmt: skip
    results = record["results"]
    shared = results["shared_system_prompt"]
    assert shared["caching_off"]["computed_prompt_tokens"] == 3 * 45
    assert shared["caching_on"]["computed_prompt_tokens"] < 3 * 45
    for turn in results["multi_turn"]["caching_on"]["turns"]:
        assert turn["cached_tokens"] == turn["reusable_tokens"]
    assert all(t["cached_tokens"] == 0 for t in results["multi_turn"]["caching_off"]["turns"])


def test_bench_memory_paged_wastes_under_a_block(tiny: str, tmp_path: Path) -> None:
    record = run_bench(
        ["memory", "--model", tiny, "--num-requests", "6", "--input-len-range", "8,64",
         "--output-len-range", "2,16", "--max-model-len", "256", "--num-kv-blocks", "40",
         "--decode-context-lens", "8,32", "--decode-output-len", "2",
         "--plot", str(tmp_path / "m.png")],
        tmp_path,
    )  # fmt: skip
    results = record["results"]
    assert results["paged"]["max_waste_tokens_per_request"] < results["paged"]["block_size"]
    assert results["contiguous"]["peak_running"] == 39 // 16  # 16 blocks per reservation
    assert results["paged"]["peak_running"] > results["contiguous"]["peak_running"]
    assert len(results["decode_vs_context"]) == 2
    assert (tmp_path / "m_decode.png").stat().st_size > 0
