"""Read Mooncake-format request traces, one JSON object per line, streaming.

    {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, ..., 13]}

`timestamp` is the arrival in milliseconds from the trace start (non-decreasing),
`hash_ids` one id per `TRACE_BLOCK_TOKENS`-token block of the prompt (the last may be partial);
equal ids at equal positions of the chain mean equal content.

A bad line is a `TraceError` naming the file and line number, or, with `skip_bad_lines`, is
skipped and counted in `TraceReader.num_skipped`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import NamedTuple

TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake traces


def block_tokens(input_length: int, position: int) -> int:
    """Tokens in prompt block `position` of a prompt of `input_length` (the last is partial)."""
    return min(TRACE_BLOCK_TOKENS, input_length - position * TRACE_BLOCK_TOKENS)


class TraceError(ValueError):
    """A malformed trace line; the message names the file and the line."""


class TraceRecord(NamedTuple):
    line: int  # 1-based line number in the file
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


class TraceReader:
    """Iterate a trace file's records without holding the file in memory.

    Each iteration reopens the file and resets the skip count.
    """

    def __init__(self, path: str, skip_bad_lines: bool = False) -> None:
        self.path = path
        self.skip_bad_lines = skip_bad_lines
        self.num_skipped = 0
        self.first_errors: list[str] = []  # up to 5 skipped lines' reasons

    def __iter__(self) -> Iterator[TraceRecord]:
        self.num_skipped = 0
        self.first_errors = []
        last_timestamp = float("-inf")
        try:
            file = open(self.path, encoding="utf-8")  # noqa: SIM115 (closed below)
        except OSError as error:
            raise TraceError(f"trace: cannot read {self.path}: {error.strerror}") from None
        with file:
            for number, text in enumerate(file, start=1):
                if not text.strip():
                    continue
                try:
                    record = parse_line(text, number)
                    if record.timestamp_ms < last_timestamp:
                        raise TraceError(
                            f"timestamp {record.timestamp_ms:g} is before the previous line's "
                            f"{last_timestamp:g} (the trace must be sorted by arrival)"
                        )
                except TraceError as error:
                    message = f"{self.path}:{number}: {error}"
                    if not self.skip_bad_lines:
                        raise TraceError(message) from None
                    self.num_skipped += 1
                    if len(self.first_errors) < 5:
                        self.first_errors.append(message)
                    continue
                last_timestamp = record.timestamp_ms
                yield record


def parse_line(text: str, number: int = 0) -> TraceRecord:
    """One trace line -> `TraceRecord`; `TraceError` (without the location) when malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise TraceError(f"not JSON ({error.msg})") from None
    if not isinstance(obj, dict):
        raise TraceError("not a JSON object")
    for name in ("timestamp", "input_length", "output_length", "hash_ids"):
        if name not in obj:
            raise TraceError(f"missing field {name!r}")
    timestamp = obj["timestamp"]
    if not _is_number(timestamp) or timestamp < 0:
        raise TraceError(f"timestamp: must be a number >= 0, got {timestamp!r}")
    input_length, output_length = obj["input_length"], obj["output_length"]
    if not _is_int(input_length) or input_length < 1:
        raise TraceError(f"input_length: must be an integer >= 1, got {input_length!r}")
    if not _is_int(output_length) or output_length < 0:
        raise TraceError(f"output_length: must be an integer >= 0, got {output_length!r}")
    hash_ids = obj["hash_ids"]
    if not isinstance(hash_ids, list) or not all(_is_int(h) for h in hash_ids):
        raise TraceError("hash_ids: must be a list of integers")
    expected = -(-input_length // TRACE_BLOCK_TOKENS)
    if len(hash_ids) != expected:
        raise TraceError(
            f"hash_ids: {len(hash_ids)} ids for input_length {input_length} "
            f"(expected {expected}, one per {TRACE_BLOCK_TOKENS}-token block)"
        )
    return TraceRecord(number, float(timestamp), input_length, output_length, tuple(hash_ids))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
