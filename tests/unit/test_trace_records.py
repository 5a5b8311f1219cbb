"""Trace reading: exact records, errors that name the line, skipping and counting bad lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvserve.trace.records import TraceError, TraceReader, TraceRecord


def write(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def rec(ts: float, n_in: int, n_out: int, ids: list[int]) -> str:
    return json.dumps(
        {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids}
    )


def test_reads_records_with_line_numbers_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, [rec(0, 512, 3, [0]), "", rec(5, 513, 0, [0, 1])])
    assert list(TraceReader(path)) == [
        TraceRecord(1, 0.0, 512, 3, (0,)),
        TraceRecord(3, 5.0, 513, 0, (0, 1)),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 1}', "missing field 'hash_ids'"),
        (rec(-1, 5, 1, [0]), "timestamp: must be a number >= 0"),
        (rec(1, 0, 1, []), "input_length: must be an integer >= 1"),
        (rec(1, 5, -2, [0]), "output_length: must be an integer >= 0"),
        (rec(1, 5, 1, ["a"]), "hash_ids: must be a list of integers"),  # type: ignore[list-item]
        (rec(1, 1025, 1, [0, 1]), "2 ids for input_length 1025 (expected 3"),
    ],
)
def test_a_bad_line_is_an_error_naming_its_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, [rec(0, 10, 1, [0]), line])
    with pytest.raises(TraceError, match=rf"trace\.jsonl:2: .*{re.escape(message)}"):
        list(TraceReader(path))


def test_unsorted_timestamps_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, [rec(10, 10, 1, [0]), rec(9, 10, 1, [1])])
    with pytest.raises(TraceError, match=r":2: timestamp 9 is before the previous line's 10"):
        list(TraceReader(path))


def test_skip_bad_lines_counts_them_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, [rec(0, 10, 1, [0]), "oops", rec(3, 10, 1, [1]), rec(2, 10, 1, [2]),
                            rec(4, 10, 1, [3])])  # fmt: skip
    reader = TraceReader(path, skip_bad_lines=True)
    assert [r.line for r in reader] == [1, 3, 5]
    assert reader.num_skipped == 2
    assert len(reader.first_errors) == 2 and ":2: not JSON" in reader.first_errors[0]
    assert [r.line for r in reader] == [1, 3, 5] and reader.num_skipped == 2  # re-iterable


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read .*nope.jsonl"):
        list(TraceReader(str(tmp_path / "nope.jsonl")))
