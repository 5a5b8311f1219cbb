"""`AsyncEngine.build`: the engine is built on the thread that steps it (`kvserve serve`'s path;
see AsyncEngine's docstring for why), and a failed build raises in the caller."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from kvserve.engine.engine import Engine
from kvserve.sampling_params import SamplingParams
from kvserve.server.async_engine import AsyncEngine
from tests.helpers import assert_no_blocks_held, make_engine


def test_the_engine_is_built_and_stepped_on_one_thread(tiny_llama: Path) -> None:
    threads: list[str] = []

    def build() -> Engine:
        threads.append(threading.current_thread().name)
        engine = make_engine(str(tiny_llama), num_kv_blocks=64)
        step = engine.step

        def recorded_step() -> list:  # type: ignore[type-arg]
            threads.append(threading.current_thread().name)
            return step()

        engine.step = recorded_step  # type: ignore[method-assign]
        return engine

    async_engine = AsyncEngine.build(build)
    try:
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

        async def generate() -> list[int]:
            last = None
            async for output in async_engine.generate("r", {"prompt_token_ids": [3, 4, 5]}, params):
                last = output
            assert last is not None
            return list(last.outputs[0].token_ids)

        assert len(asyncio.run(generate())) == 5
    finally:
        async_engine.shutdown()
    assert threads[0] == "kvserve-engine"
    assert len(threads) >= 5 and set(threads) == {"kvserve-engine"}
    assert_no_blocks_held(async_engine.engine)


def test_a_failed_build_raises_in_the_caller() -> None:
    def build() -> Engine:
        raise ValueError("model: no such file")

    with pytest.raises(ValueError, match="model: no such file"):
        AsyncEngine.build(build)
