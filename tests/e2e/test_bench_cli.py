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
    record: dict[str, Any] = json.loads(out.read_text(), parse_constant=_not_json)
    return record


def _not_json(constant: str) -> None:
    raise AssertionError(f"the record holds {constant}, which strict JSON does not allow")


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


def test_bench_serve_launches_each_config_and_replays_a_trace(tiny: str, tmp_path: Path) -> None:
    """Two servers (prefix caching on, off) replay one trace whose requests share blocks."""
    trace = tmp_path / "trace.jsonl"
    chains = [[0, 1, 2], [0, 1, 3], [0, 1, 2, 4], [5], [0, 1, 2, 4, 6]]  # ids of 512 tokens
    trace.write_text("".join(
        json.dumps({"timestamp": 200 * i, "input_length": 512 * len(ids) - 100,
                    "output_length": 128, "hash_ids": ids}) + "\n"
        for i, ids in enumerate(chains)
    ))  # fmt: skip
    server = f"--model {tiny} --max-model-len 256 --num-kv-blocks 64"
    record = run_bench(
        ["serve", "--launch", server, "--launch", f"{server} --no-enable-prefix-caching",
         "--label", "cache on", "--label", "cache off", "--vocab-size", "200",
         "--trace", str(trace), "--scale", "0.03125", "--time-scale", "1", "--slo-ttft-ms", "60000",
         "--plot", str(tmp_path / "serve.png"), "--no-progress"],
        tmp_path,
    )  # fmt: skip
    on, off = record["results"]["runs"]
    assert on["workload"]["num_requests"] == 5 and on["workload"]["block_tokens"] == 16
    for run in (on, off):
        metrics = run["metrics"]
        assert metrics["completed"] == 5 and metrics["failed"] == 0
        assert metrics["total_output_tokens"] == 5 * 4  # 128 / 32 each, ignore_eos
        assert metrics["total_input_tokens"] == sum(16 * len(ids) - 3 for ids in chains)
        assert metrics["good_requests"] == 5
    # Prompts are 16 tokens per id minus 3 in the last (partial) block, and only full blocks
    # are cached: the 2nd request reuses ids 0 1 of the 1st, the 3rd 0 1 (the 1st's block 2
    # is partial), the 5th 0 1 2 of the 3rd. 200 ms apart, each is done before the next.
    assert on["metrics"]["total_cached_tokens"] == 16 * (2 + 2 + 3)
    assert off["metrics"]["total_cached_tokens"] == 0
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_bench_serve_tags_long_prompts_among_decodes(tiny: str, tmp_path: Path) -> None:
    server = f"--model {tiny} --max-model-len 512 --num-kv-blocks 128"
    record = run_bench(
        ["serve", "--launch", server, "--vocab-size", "200", "--num-prompts", "4",
         "--input-len", "8", "--output-len", "30", "--num-long-prompts", "2",
         "--long-input-len", "300", "--long-prompt-start", "0.05", "--long-prompt-interval",
         "0.05", "--no-progress"],
        tmp_path,
    )  # fmt: skip
    metrics = record["results"]["runs"][0]["metrics"]
    assert metrics["completed"] == 6
    assert metrics["by_tag"]["random"]["total_output_tokens"] == 4 * 30
    assert metrics["by_tag"]["long"]["total_input_tokens"] == 2 * 300
    assert metrics["by_tag"]["random"]["p99_itl_ms"] > 0


def test_bench_serve_rejects_both_or_neither_server(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["bench", "serve", "--vocab-size", "10", "--output-json", str(out)]) == 2
    assert main(["bench", "serve", "--vocab-size", "10", "--base-url", "http://x",
                 "--launch", "", "--output-json", str(out)]) == 2  # fmt: skip


def test_bench_kv_dtype_speed_and_bytes(tiny: str, tmp_path: Path) -> None:
    record = run_bench(
        ["kv-dtype", "--model", tiny, "--kv-cache-dtypes", "auto,int8,int4", "--skip-ppl",
         "--batch-sizes", "1,2", "--input-len", "8", "--decode-steps", "3", "--num-rounds", "1",
         "--num-kv-blocks", "64", "--max-model-len", "128"],
        tmp_path,
    )  # fmt: skip
    rows = {row["kv_cache_dtype"]: row for row in record["results"]["rows"]}
    assert list(rows) == ["auto", "int8", "int4"]
    for row in rows.values():
        assert row["measured"] == row["formula"] and row["decode_tok_s_b2"] > 0
    assert rows["auto"]["decode_ratio_b1"] == 1.0
    assert rows["int4"]["measured"] < rows["int8"]["measured"] < rows["auto"]["measured"]


def test_bench_inspector_copies_only_while_watched(tiny: str, tmp_path: Path) -> None:
    record = run_bench(
        ["inspector", "--model", tiny, "--concurrency", "2", "--input-len", "8",
         "--output-len", "4", "--phase-s", "1.5", "--num-phases", "3", "--warmup-s", "0.5",
         "--watch-s", "0.5"],
        tmp_path,
    )  # fmt: skip
    results = record["results"]
    assert results["closed"]["num_steps"] > 0 and results["open"]["num_steps"] > 0
    assert results["closed"]["num_copies"] == 0
    assert results["open"]["num_copies"] > 0
    assert results["open"]["copy_share"] > 0
    assert results["open"]["answer_share"] > 0 and results["closed"]["answer_share"] == 0
    assert len(results["decode_step_ratio_by_pair"]) == 2
    from kvserve.server.inspector import routes, state_json

    assert routes.state_json is state_json.state_json  # the bench's clock is gone
