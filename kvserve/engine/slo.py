"""SLO-aware early rejection: predict a request's latency before any prefill is spent on it.

Mooncake's conductor rejects a request at arrival when it would miss its latency objective
anyway, so the prefill it would have cost goes to requests that can still make theirs. On one
engine the prediction is:

    TTFT ~ (uncached prompt tokens queued ahead + the request's own) / prefill rate
    TPOT ~ decode step time at (running decodes + 1) rows

Both rates are the engine's own, measured as it runs (`StepRates`, exponentially weighted, so
they follow the machine's load): prefill tokens per second from the steps that prefill, and the
decode step time as a line `a + b * rows` fitted to the all-decode steps. Until a rate is
measured there is no prediction and the request is admitted. Everything here is pure: the
engine feeds `StepRates` and publishes `EngineLoad`; the server decides with `rejection`.
"""

from __future__ import annotations

from typing import NamedTuple

# Weight of the newest observation in the running averages: about the last 20 steps count.
EWMA_WEIGHT = 0.05


class EngineLoad(NamedTuple):
    """What is ahead of a request arriving now."""

    num_queued_prefill_tokens: int  # prompt tokens not computed yet, waiting or running
    num_decoding: int  # running requests past their prompt: the decode rows of a step


class SLO(NamedTuple):
    """Latency objectives in seconds; None: not set."""

    ttft_s: float | None = None
    tpot_s: float | None = None


class Prediction(NamedTuple):
    """Predicted latencies in seconds; None where the engine has not measured the rate."""

    ttft_s: float | None
    tpot_s: float | None


class StepRates:
    """The engine's measured prefill rate and decode step time, exponentially weighted."""

    def __init__(self, weight: float = EWMA_WEIGHT) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight: must be in (0, 1], got {weight}")
        self.weight = weight
        self._prefill_s = 0.0  # decayed seconds of prefilling steps
        self._prefill_tokens = 0.0  # and their decayed token count
        # Decayed sums for the least-squares line of decode step time over rows.
        self._n = self._sx = self._sy = self._sxx = self._sxy = 0.0

    def observe(self, num_tokens: int, num_decodes: int, seconds: float) -> None:
        """One model step of `num_tokens` rows, `num_decodes` of them single-token decodes."""
        keep = 1.0 - self.weight
        if num_tokens > num_decodes:  # a step that prefills: all its rows at the prefill rate
            self._prefill_s = keep * self._prefill_s + seconds
            self._prefill_tokens = keep * self._prefill_tokens + num_tokens
        elif num_decodes > 0:
            x, y = float(num_decodes), seconds
            self._n = keep * self._n + 1.0
            self._sx, self._sy = keep * self._sx + x, keep * self._sy + y
            self._sxx, self._sxy = keep * self._sxx + x * x, keep * self._sxy + x * y

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Prompt tokens a second, or None before any prefilling step."""
        if self._prefill_s <= 0.0:
            return None
        return self._prefill_tokens / self._prefill_s

    def decode_step_s(self, num_rows: int) -> float | None:
        """The predicted time of an all-decode step of `num_rows` rows, or None before any.

        The fitted line where the steps seen span several batch sizes; with one size only
        (or a negative slope, from noise), the mean step time, scaled up linearly past the
        mean batch size (pessimistic: decode steps grow slower than their rows)."""
        if self._n <= 0.0:
            return None
        mean_x, mean_y = self._sx / self._n, self._sy / self._n
        var_x = self._sxx / self._n - mean_x * mean_x
        if var_x > 1e-9:
            slope = (self._sxy / self._n - mean_x * mean_y) / var_x
            if slope >= 0.0:
                return max(mean_y + slope * (num_rows - mean_x), 0.0)
        return mean_y * max(1.0, num_rows / mean_x)


def predict(
    load: EngineLoad, rates: StepRates, num_uncached_tokens: int, num_seqs: int = 1
) -> Prediction:
    """The TTFT and TPOT a request with `num_uncached_tokens` prompt tokens to compute and
    `num_seqs` sequences to decode would see if admitted now."""
    rate = rates.prefill_tokens_per_s
    ttft = None if rate is None else (load.num_queued_prefill_tokens + num_uncached_tokens) / rate
    return Prediction(ttft, rates.decode_step_s(load.num_decoding + num_seqs))


class Miss(NamedTuple):
    """An objective a request is predicted to miss: "ttft" or "tpot", and why (for its 429)."""

    objective: str
    message: str


def rejection(prediction: Prediction, slo: SLO) -> Miss | None:
    """The first objective of `slo` a request with this prediction would miss, or None to
    admit it."""
    checks = (
        ("ttft", "time to first token", prediction.ttft_s, slo.ttft_s),
        ("tpot", "time per output token", prediction.tpot_s, slo.tpot_s),
    )
    for objective, name, predicted, limit in checks:
        if predicted is not None and limit is not None and predicted > limit:
            message = (
                f"predicted {name} {predicted * 1000:.0f} ms exceeds the server's objective of "
                f"{limit * 1000:.0f} ms; retry later"
            )
            return Miss(objective, message)
    return None
