"""`kvserve trace stats` on hand-made traces whose figures are computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve.cli import main
from kvserve.trace.records import TraceReader
from kvserve.trace.stats import collect, summarize

# accesses in order: 1 2 | 1 3 | 1 2 4 | 5   (three hits: 1, 1, 2)
HAND_TRACE = [
    {"timestamp": 0, "input_length": 1024, "output_length": 5, "hash_ids": [1, 2]},
    {"timestamp": 1000, "input_length": 700, "output_length": 7, "hash_ids": [1, 3]},
    {"timestamp": 2000, "input_length": 1300, "output_length": 0, "hash_ids": [1, 2, 4]},
    {"timestamp": 61000, "input_length": 10, "output_length": 3, "hash_ids": [5]},
]


def _write(tmp_path: Path, rows: list[object], name: str = "t.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_hand_trace_figures(tmp_path: Path) -> None:
    summary = summarize(collect(TraceReader(_write(tmp_path, HAND_TRACE))))
    assert summary["num_requests"] == 4 and summary["duration_s"] == 61.0
    assert summary["rate_per_minute"]["requests"] == [3, 1]  # minutes 0 and 1
    assert summary["num_prompt_blocks"] == 8 and summary["num_distinct_blocks"] == 5
    assert summary["block_hit_ratio"] == 3 / 8
    assert summary["token_hit_ratio"] == 3 * 512 / (1024 + 700 + 1300 + 10)
    # block 1 at request 2: block 2 in between (1); at request 3: block 3 (1);
    # block 2 at request 3: blocks 1 and 3 in between (2)
    assert sorted(collect(TraceReader(_write(tmp_path, HAND_TRACE))).reuse_distances) == [1, 1, 2]
    assert summary["reuse_distance_blocks"]["max"] == 2
    assert summary["reuse_interval_s"]["mean"] == pytest.approx((1 + 1 + 2) / 3)
    assert summary["reused_block_lifetime_s"]["count"] == 2  # blocks 1 and 2, both 0 -> 2 s
    assert summary["reused_block_lifetime_s"]["max"] == 2.0
    assert summary["block_lifetime_s"]["count"] == 5
    assert summary["reused_blocks_dead_within_10_min"] == 1.0
    # hits per block: 2, 1, 0, 0, 0; the top 1% and 10% are both the single top block
    assert summary["hit_share_top_1pct_blocks"] == pytest.approx(2 / 3)
    assert summary["hit_share_top_10pct_blocks"] == pytest.approx(2 / 3)


def test_a_trace_with_no_reuse(tmp_path: Path) -> None:
    rows = [
        {"timestamp": i, "input_length": 512, "output_length": 1, "hash_ids": [i]} for i in range(5)
    ]
    summary = summarize(collect(TraceReader(_write(tmp_path, rows))))
    assert summary["block_hit_ratio"] == 0 and summary["reuse_distance_blocks"]["count"] == 0
    assert summary["hit_share_top_1pct_blocks"] is None


def test_cli_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, HAND_TRACE)
    plots = tmp_path / "plots"
    assert main(["trace", "stats", path, "--json", "--plot-dir", str(plots)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["block_hit_ratio"] == 3 / 8 and summary["num_skipped_lines"] == 0
    assert sorted(p.name for p in plots.iterdir()) == [
        "arrivals.png", "lengths.png", "reuse.png", "skew.png",
    ]  # fmt: skip
    assert main(["trace", "stats", path]) == 0
    assert "37.5% of blocks" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not JSON"),
        ({"timestamp": 5, "input_length": 10, "output_length": 1}, "missing field 'hash_ids'"),
        ({"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": [9]}, "before"),
    ],
)
def test_bad_lines_name_the_line_or_are_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: object, message: str
) -> None:
    rows = [*HAND_TRACE[:2], bad, *HAND_TRACE[2:]]  # line 3 is bad
    path = _write(tmp_path, rows)
    assert main(["trace", "stats", path]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3:" in err and message in err
    assert main(["trace", "stats", path, "--json", "--skip-bad-lines"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_skipped_lines"] == 1 and summary["num_requests"] == 4
    assert summary["block_hit_ratio"] == 3 / 8
