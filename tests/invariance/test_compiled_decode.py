"""torch.compile'd decode steps give the same tokens as eager ones (padding rows included)."""

from __future__ import annotations

from typing import Any

import pytest

from kvserve.sampling_params import SamplingParams
from tests.helpers import (
    decode_kernel_expected,
    make_engine,
    random_prompts,
    run_engine,
    token_ids,
)

pytestmark = pytest.mark.slow  # compiling takes tens of seconds per bucket


@pytest.mark.parametrize(
    ("name", "backend"),
    [("llama", "auto"), ("llama", "torch"), ("gpt2", "auto")],
    ids=["llama-cpp-kernel", "llama-inductor-kernel", "gpt2"],
)
def test_compiled_decode_equals_eager(
    tiny_checkpoints: dict[str, str], name: str, backend: str
) -> None:
    """Decode attention in kvserve's C++ kernel (auto) or inductor's fused kernel (torch),
    against eager gather + SDPA."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    eager = make_engine(tiny_checkpoints[name], attention_backend="torch")
    prompts = random_prompts(eager.model_config.vocab_size, [5, 17, 9], seed=11)
    expected = run_engine(eager, prompts, params)
    compiled = make_engine(
        tiny_checkpoints[name], compile=True, compile_sizes=(1, 4), attention_backend=backend
    )
    assert compiled.model_runner.compiled is not None
    kernel = backend == "auto" and decode_kernel_expected()
    assert compiled.model_runner.attention_backend.name == ("cpp" if kernel else "fused")
    outputs = run_engine(compiled, prompts, params)  # 3 decodes pad to bucket 4
    assert token_ids(outputs) == token_ids(expected)
    _assert_same_logprobs(outputs, expected)
    alone = run_engine(compiled, prompts[:1], params)  # bucket 1, no padding
    assert token_ids(alone) == token_ids(expected)[:1]


def test_compiled_variable_length_steps_equal_eager(tiny_checkpoints: dict[str, str]) -> None:
    """Prefill chunks mixed with decodes, and more decodes than the largest bucket, run
    through the dynamic-length graph: same tokens and logprobs as eager."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)
    engine_args = dict(max_num_batched_tokens=16, block_size=4)
    eager = make_engine(tiny_checkpoints["llama"], **engine_args)
    prompts = random_prompts(eager.model_config.vocab_size, [3, 30, 7, 21, 2, 12], seed=5)
    expected = run_engine(eager, prompts, params)
    compiled = make_engine(
        tiny_checkpoints["llama"], compile=True, compile_sizes=(2,), **engine_args
    )
    outputs = run_engine(compiled, prompts, params)
    assert token_ids(outputs) == token_ids(expected)
    _assert_same_logprobs(outputs, expected)


@pytest.mark.parametrize(
    ("kv_cache_dtype", "backend"),
    [("int8", "auto"), ("int8", "torch"), ("fp8_e4m3", "auto"), ("int4", "auto")],
)
def test_compiled_quantized_cache_equals_eager(
    tiny_checkpoints: dict[str, str], kv_cache_dtype: str, backend: str
) -> None:
    """int8 decodes through kvserve's C++ kernel (auto) or inductor's fused kernel (torch),
    both dequantizing in their loops; fp8 through the fused kernel where inductor vectorizes
    bytes; int4 by gather + dequantize + SDPA: the same tokens as eager with the same dtype."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine_args = dict(kv_cache_dtype=kv_cache_dtype, block_size=4, attention_backend=backend)
    eager = make_engine(tiny_checkpoints["llama"], **engine_args)
    prompts = random_prompts(eager.model_config.vocab_size, [6, 19, 11], seed=9)
    expected = run_engine(eager, prompts, params)
    compiled = make_engine(
        tiny_checkpoints["llama"], compile=True, compile_sizes=(4,), **engine_args
    )
    assert token_ids(run_engine(compiled, prompts, params)) == token_ids(expected)


def _assert_same_logprobs(outputs: list[Any], expected: list[Any]) -> None:
    for out, ref in zip(outputs, expected, strict=True):
        pairs = zip(out.outputs[0].logprobs or [], ref.outputs[0].logprobs or [], strict=True)
        for got, want in pairs:
            for token_id, logprob in want.items():
                assert got[token_id].logprob == pytest.approx(logprob.logprob, abs=1e-4)


def test_decode_batch_split_across_buckets_equals_eager(tiny_checkpoints: dict[str, str]) -> None:
    """With costs that make 1-row steps cheap, 3 decodes run as three bucket-1 forwards (not
    one padded to 4): same tokens and logprobs as eager."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    eager = make_engine(tiny_checkpoints["llama"])
    prompts = random_prompts(eager.model_config.vocab_size, [5, 17, 9], seed=12)
    expected = run_engine(eager, prompts, params)
    compiled = make_engine(tiny_checkpoints["llama"], compile=True, compile_sizes=(1, 4))
    decode = compiled.model_runner.compiled
    assert decode is not None and set(decode._costs) == {1, 4}  # measured in warmup
    decode._costs = {1: 1.0, 4: 10.0}
    decode._chunk_plans.clear()
    assert decode.chunks_for(3) == [1, 1, 1]
    outputs = run_engine(compiled, prompts, params)
    assert token_ids(outputs) == token_ids(expected)
    _assert_same_logprobs(outputs, expected)


@pytest.mark.parametrize(
    ("costs", "rows", "chunks"),
    [
        ({16: 40.0, 32: 70.0, 64: 130.0}, 36, [32, 16]),  # pad the remainder of 4 to 16
        ({4: 12.0, 32: 70.0, 64: 130.0}, 36, [32, 4]),
        ({4: 12.0, 32: 70.0, 64: 80.0}, 36, [64]),  # padding is cheaper than two forwards
        ({4: 12.0, 32: 70.0, 64: 130.0}, 60, [64]),
        ({1: 5.0, 4: 12.0}, 4, [4]),
    ],
)
def test_chunks_for_minimizes_the_measured_cost(
    costs: dict[int, float], rows: int, chunks: list[int]
) -> None:
    from kvserve.engine.compiled_decode import CompiledDecode

    compiled = object.__new__(CompiledDecode)  # no model: chunks_for reads sizes and costs
    compiled.sizes = tuple(sorted(costs))
    compiled._costs, compiled._chunk_plans = costs, {}
    assert compiled.chunks_for(rows) == chunks
    assert sum(chunks) >= rows
