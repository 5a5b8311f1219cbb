"""What one request or client may cost the server: `ServerLimits`, one flag per field.

The transport enforces the first five (kvserve/server/middleware.py, admission.py,
http_protocol.py); the generation routes enforce `max_prompt_chars`, `max_n` and
`max_batch_prompts` after parsing the body, and the SLO gate (slo_gate.py) the latency
objectives once a prompt is tokenized.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from kvserve.engine.slo import SLO

MIB = 1024 * 1024
_FLOAT_FIELDS = frozenset({"header_timeout", "slo_ttft_ms", "slo_tpot_ms"})


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
    slo_ttft_ms: float | None = field(
        default=None,
        metadata={"help": "429 at arrival when the predicted time to first token exceeds this"},
    )
    slo_tpot_ms: float | None = field(
        default=None,
        metadata={"help": "429 at arrival when the predicted time per output token exceeds this"},
    )

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_connections", "max_n", "max_batch_prompts"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.max_queue_len is not None:
            _check_int("max_queue_len", self.max_queue_len, minimum=0)
        if self.max_prompt_chars is not None:
            _check_int("max_prompt_chars", self.max_prompt_chars, minimum=1)
        _check_positive("header_timeout", self.header_timeout)
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))

    def slo(self) -> SLO:
        """The latency objectives in seconds (engine/slo.py)."""
        ttft, tpot = self.slo_ttft_ms, self.slo_tpot_ms
        return SLO(None if ttft is None else ttft / 1000.0, None if tpot is None else tpot / 1000.0)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServerLimits` field: `max_queue_len` -> `--max-queue-len`."""
    group = parser.add_argument_group("server limits")
    for limit in dataclasses.fields(ServerLimits):
        kind = float if limit.name in _FLOAT_FIELDS else int
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
