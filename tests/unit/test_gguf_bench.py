"""The arithmetic of scripts/gguf_bench.py's report: bytes per token, bandwidth, greedy check."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("gguf_bench_report")


def _tensors(report: ModuleType, tied: bool) -> list:
    tensors = [
        report.TensorInfo("token_embd.weight", "Q8_0", 1000, 1063),
        report.TensorInfo("blk.0.attn_q.weight", "Q4_1", 64, 40),
        report.TensorInfo("blk.0.attn_norm.weight", "F32", 8, 32),
    ]
    return tensors if tied else [*tensors, report.TensorInfo("output.weight", "Q6_K", 512, 420)]


def test_weight_bytes_per_token_counts_each_format(report: ModuleType) -> None:
    tied = _tensors(report, tied=True)
    assert report.weight_bytes_per_token(tied, None) == 1063 + 40 + 32
    assert report.weight_bytes_per_token(tied, frozenset()) == 4 * (1000 + 64 + 8)
    assert report.weight_bytes_per_token(tied, frozenset({"Q4_1"})) == 4 * 1000 + 40 + 4 * 8


def test_untied_token_embedding_is_not_read_whole(report: ModuleType) -> None:
    untied = _tensors(report, tied=False)
    assert report.weight_bytes_per_token(untied, None) == 40 + 32 + 420
    assert report.weight_bytes_per_token(untied, frozenset()) == 4 * (64 + 8 + 512)


def test_bandwidth_fraction(report: ModuleType) -> None:
    # 100 MB a token at 50 tok/s streams 5 GB/s: a quarter of 20 GB/s.
    assert report.bandwidth_fraction(100_000_000, 50.0, 20e9) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="bandwidth_b_s"):
        report.bandwidth_fraction(100, 1.0, 0.0)


def test_first_divergence(report: ModuleType) -> None:
    assert report.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert report.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert report.first_divergence([1, 2, 3], [1, 2]) == 2


def test_speed_table_rows(report: ModuleType) -> None:
    workloads = {
        "decode 128+256": {"median_decode_tok_s": 40.0, "median_ttft_ms": 9.0},
        "decode 1024+128": {"median_decode_tok_s": 30.0, "median_ttft_ms": 90.0},
        "prefill 512": {"median_prefill_tok_s": 1000.0, "median_ttft_ms": 512.0},
        "prefill 2048": {"median_prefill_tok_s": 800.0, "median_ttft_ms": 2560.0},
    }
    base = {
        "workloads": workloads,
        "peak_rss_mib": 100.0,
        "diverges_at": 3,
        "load_avg_1m": [0.5, 2.5],
    }
    faster = {**base, "workloads": {**workloads, "decode 128+256": {"median_decode_tok_s": 80.0}}}
    results = {"systems": {"a": base, "b": {**faster, "diverges_at": None}, "c": {"skipped": "no"}}}
    rows = report.speed_table(results, {"a": "A", "b": "B", "c": "C"}, baseline="a")
    cells = [row.strip("| ").split(" | ") for row in rows[2:]]
    assert cells[0] == [
        "A", "40.0", "30.0", "1000 (512 ms)", "800 (2560 ms)", "1.00x", "100 MiB", "diverges at 3",
        "0.5-2.5",
    ]  # fmt: skip
    assert cells[1][:2] == ["B", "80.0"] and cells[1][5:8] == ["2.00x", "100 MiB", "agrees"]
    assert cells[2] == ["C", "-", "-", "-", "-", "-", "-", "no", "-"]
