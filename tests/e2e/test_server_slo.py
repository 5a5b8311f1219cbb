"""SLO admission in the server (`--slo-ttft-ms`, `--slo-tpot-ms`; server/slo_gate.py).

The engine's measured rates are replaced by fixed ones, so every prediction is exact and no
test depends on the machine's speed: prefill at 1,000 tokens a second (a 40-token prompt on
an idle engine: 40 ms to its first token), decode steps of 8 ms + 2 ms a row.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from kvserve.engine.slo import SLO, StepRates
from kvserve.server.async_engine import AsyncEngine
from kvserve.server.limits import ServerLimits
from tests.helpers import make_engine
from tests.server_helpers import StepGate, assert_openai_error, serve_in_thread, wait_until_idle


class FixedRates(StepRates):
    """Rates that the engine's steps do not move."""

    def observe(self, num_tokens: int, num_decodes: int, seconds: float) -> None:
        return None


def _fixed_rates() -> FixedRates:
    rates = FixedRates(weight=0.5)
    StepRates.observe(rates, 1000, 0, 1.0)  # 1,000 prefill tokens a second
    StepRates.observe(rates, 1, 1, 0.010)
    StepRates.observe(rates, 4, 4, 0.016)  # decode: 8 ms + 2 ms a row
    return rates


def _engine(tiny_llama: Path, slo: SLO) -> tuple[AsyncEngine, StepGate]:
    engine = make_engine(str(tiny_llama), num_kv_blocks=64)
    engine.step_rates = _fixed_rates()
    gate = StepGate(engine)
    async_engine = AsyncEngine(engine, slo=slo)
    gate.before_step = async_engine._apply_commands
    return async_engine, gate


def _body(num_tokens: int, n: int = 1) -> dict[str, object]:
    prompt = [3 + i % 200 for i in range(num_tokens)]
    return {"prompt": prompt, "max_tokens": 4, "ignore_eos": True, "n": n}


def _slo_rejections(base: str, objective: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("kvserve:slo_rejections_total") and f'"{objective}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_ttft_objective_counts_the_requests_queued_ahead(tiny_llama: Path) -> None:
    """SLO 60 ms: 40 tokens alone are admitted (40 ms), 70 are not (70 ms); 40 more behind 40
    queued (steps held, so the first has not even reached a step) are not either (80 ms)."""
    async_engine, gate = _engine(tiny_llama, SLO(ttft_s=0.060))

    async def scenario(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=300) as http:
            alone_too_long = await http.post("/v1/completions", json=_body(70))
            first = asyncio.ensure_future(http.post("/v1/completions", json=_body(40)))
            while async_engine.num_unfinished != 1:
                await asyncio.sleep(0.02)  # the first is queued; no step runs yet
            behind = await http.post("/v1/completions", json=_body(40))
            gate.open()
            admitted = await first
            after = await http.post("/v1/completions", json=_body(40))  # idle again
            return [alone_too_long, behind, admitted, after]

    try:
        with serve_in_thread(async_engine) as base:
            replies = asyncio.run(asyncio.wait_for(scenario(base), timeout=300))
            rejections = _slo_rejections(base, "ttft")
            wait_until_idle(base)
    finally:
        gate.open()
    alone_too_long, behind, admitted, after = replies
    for reply, predicted in ((alone_too_long, 70), (behind, 80)):
        error = assert_openai_error(reply, 429)
        assert error["type"] == "overloaded" and reply.headers["retry-after"] == "1"
        assert error["message"] == (
            f"predicted time to first token {predicted} ms exceeds the server's objective of "
            "60 ms; retry later"
        )
    assert admitted.status_code == after.status_code == 200
    assert admitted.json()["usage"]["completion_tokens"] == 4
    assert rejections == 2


def test_tpot_objective_counts_the_sequences_a_request_adds(tiny_llama: Path) -> None:
    """SLO 13 ms a token: n=1 decodes at 10 ms a step, n=3 at 14 ms."""
    async_engine, gate = _engine(tiny_llama, SLO(tpot_s=0.013))
    gate.open()
    with serve_in_thread(async_engine) as base:
        one = httpx.post(f"{base}/v1/completions", json=_body(5), timeout=300)
        three = httpx.post(f"{base}/v1/completions", json=_body(5, n=3), timeout=300)
        assert one.status_code == 200
        error = assert_openai_error(three, 429)
        assert "time per output token 14 ms" in error["message"]
        assert _slo_rejections(base, "tpot") == 1 and _slo_rejections(base, "ttft") == 0
        wait_until_idle(base)


def test_without_objectives_nothing_is_predicted(tiny_llama: Path) -> None:
    async_engine = AsyncEngine(make_engine(str(tiny_llama), num_kv_blocks=64))
    assert async_engine.slo_gate is None
    async_engine.shutdown()
    assert AsyncEngine(make_engine(str(tiny_llama)), slo=SLO()).slo_gate is None


def test_flags_name_the_field_and_convert_to_seconds() -> None:
    assert ServerLimits(slo_ttft_ms=250, slo_tpot_ms=50.5).slo() == SLO(0.25, 0.0505)
    assert ServerLimits().slo() == SLO(None, None)
    for bad in (0, -1.0, float("inf"), "fast", True):
        with pytest.raises(ValueError, match="^slo_ttft_ms: "):
            ServerLimits(slo_ttft_ms=bad)  # type: ignore[arg-type]
