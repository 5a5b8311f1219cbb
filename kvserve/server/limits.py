"""What one request or client may cost the server: `ServerLimits`, one flag per field.

The transport enforces the first five (kvserve/server/middleware.py, admission.py,
http_protocol.py); the generation routes enforce `max_prompt_chars`, `max_n` and
`max_batch_prompts` after parsing the body.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """Limits of `kvserve serve`; each field is the flag `--field-name`.

    Raises:
        ValueError: a field is out of range ("field: ...").
    """

    max_request_body_bytes: int = field(
        default=4 * MIB, metadata={"help": "413 past this many body bytes (read or announced)"}
    )
    header_timeout: float = field(
        default=10.0, metadata={"help": "seconds a client may take to send a request's headers"}
    )
    max_connections: int = field(
        default=512, metadata={"help": "past this many open connections a request gets a 503"}
    )
    max_queue_len: int | None = field(
        default=None, metadata={"help": "429 when more than this many sequences would wait"}
    )
    max_prompt_chars: int | None = field(
        default=None, metadata={"help": "400 past this many prompt characters (default: derived)"}
    )
    max_n: int = field(default=16, metadata={"help": "the largest n and best_of"})
    max_batch_prompts: int = field(default=64, metadata={"help": "prompts in one request"})

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_connections", "max_n", "max_batch_prompts"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.max_queue_len is not None:
            _check_int("max_queue_len", self.max_queue_len, minimum=0)
        if self.max_prompt_chars is not None:
            _check_int("max_prompt_chars", self.max_prompt_chars, minimum=1)
        timeout = self.header_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ValueError(f"header_timeout: must be a number, got {timeout!r}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"header_timeout: must be a finite number > 0, got {timeout!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServerLimits` field: `max_queue_len` -> `--max-queue-len`."""
    group = parser.add_argument_group("server limits")
    for limit in dataclasses.fields(ServerLimits):
        kind = float if limit.name == "header_timeout" else int
        group.add_argument(
            "--" + limit.name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"{limit.metadata['help']} (default: {limit.default})",
        )


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """Only flags the user gave override the defaults."""
    given = {
        limit.name: getattr(args, limit.name)
        for limit in dataclasses.fields(ServerLimits)
        if getattr(args, limit.name, None) is not None
    }
    return ServerLimits(**given)
