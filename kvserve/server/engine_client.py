"""What the OpenAI server needs of an engine: `AsyncEngine` (one engine, a thread) and
`kvserve cluster`'s `ClusterEngine` (replicas on Ray) both provide it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from prometheus_client.registry import Collector

from kvserve.engine.prompts import PromptInput
from kvserve.outputs import EngineMetrics, RequestOutput
from kvserve.sampling_params import SamplingParams


class EngineClient(Protocol):
    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def max_num_seqs(self) -> int:
        """Requests run at once (admission sizes its seats by it)."""
        ...

    def new_request_id(self, prefix: str) -> str: ...

    def get_metrics(self) -> EngineMetrics: ...

    def generate(
        self, request_id: str, prompt: PromptInput, params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """The request's cumulative outputs; ValueError for invalid input before any work."""
        ...

    def health(self) -> dict[str, Any]:
        """/health's body: "status" is "ok", "degraded" (some replicas down: 200 still) or
        "down" (nothing can answer: 503)."""
        ...

    def collectors(self) -> list[Collector]:
        """Prometheus collectors of the engine's own, beside the engine metrics."""
        ...

    def shutdown(self) -> None: ...
