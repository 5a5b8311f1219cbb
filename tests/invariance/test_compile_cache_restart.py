"""A second start with --compile loads every graph from disk instead of compiling it, and a
different model of the same shape never loads the first one's graph (its prepacked weights
live inside the cache entry). Each start is a fresh process, as a restart is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvserve.sampling_params import SamplingParams
from tests.helpers import make_engine, run_engine, token_ids

pytestmark = pytest.mark.slow  # three processes that compile or load tiny models

_PROMPT = [3, 17, 42, 9, 100]
_START = """
import json, sys
from kvserve.engine.compile_cache import compile_cache_counts
from kvserve.sampling_params import SamplingParams
from tests.helpers import make_engine, run_engine, token_ids

before = compile_cache_counts()
engine = make_engine(sys.argv[1], compile=True, compile_sizes=(1,))
counts = compile_cache_counts().since(before)
params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
tokens = token_ids(run_engine(engine, [json.loads(sys.argv[2])], params))
print(json.dumps({"counts": counts._asdict(), "tokens": tokens}))
"""


def _start(model: Path, cache: Path) -> dict[str, Any]:
    """One process that builds a compiled engine on `model` with `cache` as kvserve's cache
    directory: the FX graph cache's counts during start-up, and greedy tokens."""
    env = {key: value for key, value in os.environ.items() if key != "TORCHINDUCTOR_CACHE_DIR"}
    env["KVSERVE_CACHE_DIR"] = str(cache)
    result = subprocess.run(
        [sys.executable, "-c", _START, str(model), json.dumps(_PROMPT)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def test_second_start_loads_the_compiled_graphs(tmp_path: Path, make_tiny_checkpoint: Any) -> None:
    model = make_tiny_checkpoint("llama", tmp_path, seed=3)
    other = make_tiny_checkpoint("llama", tmp_path, seed=4)  # same shapes, other weights
    cache = tmp_path / "cache"
    first = _start(model, cache)
    assert first["counts"]["misses"] >= 2  # the frozen bucket and the variable-length graph
    assert first["counts"]["bypasses"] == 0  # nothing left out of the cache

    second = _start(model, cache)
    assert second["counts"] == {"hits": first["counts"]["misses"], "misses": 0, "bypasses": 0}
    assert second["tokens"] == first["tokens"]

    third = _start(other, cache)
    assert third["counts"]["misses"] >= 1  # the frozen bucket, keyed by the weights
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eager = token_ids(run_engine(make_engine(str(other)), [_PROMPT], params))
    assert third["tokens"] == eager
    assert third["tokens"] != first["tokens"]
