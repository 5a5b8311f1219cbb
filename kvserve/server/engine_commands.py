"""What the event loop asks of the engine thread (server/async_engine.py), and what the
engine thread publishes back about its load. Only the engine thread touches the engine:
everything else goes through these commands, applied between two steps."""

from __future__ import annotations

from typing import NamedTuple

from kvserve.engine.continuation import ContinuedSample
from kvserve.engine.prompts import TokenizedPrompt
from kvserve.engine.slo import EngineLoad, StepRates
from kvserve.sampling_params import SamplingParams


class AddRequest(NamedTuple):
    """Queue a tokenized, validated prompt under `request_id` (`seq`: its SLO gate number)."""

    request_id: str
    prompt: TokenizedPrompt
    params: SamplingParams
    seq: int = 0
    continue_from: list[ContinuedSample] | None = None


class AbortRequest(NamedTuple):
    """Drop `request_id` (waiting or running) and free its KV blocks."""

    request_id: str


Command = AddRequest | AbortRequest


class LoadReport(NamedTuple):
    """The engine's load and measured rates, with every request up to `applied_seq` queued."""

    applied_seq: int
    load: EngineLoad
    rates: StepRates
