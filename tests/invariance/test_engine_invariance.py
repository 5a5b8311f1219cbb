"""The same greedy tokens however the engine is configured or loaded.

paged == contiguous == none; chunked prefill == whole; block sizes 1/16/32 agree; a request
alone == in a batch of 8; a pool small enough to force preemption changes nothing. Invariants
are checked after every step and no KV block is held at the end.
"""

from __future__ import annotations

import pytest

from kvserve.sampling_params import SamplingParams
from tests.helpers import (
    decode_kernel_expected,
    make_engine,
    random_prompts,
    run_engine,
    token_ids,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
LENGTHS = [3, 40, 17, 64, 1, 29, 50, 8]


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def reference(llama: str) -> list[list[int]]:
    engine = make_engine(llama)
    prompts = random_prompts(engine.model_config.vocab_size, LENGTHS, seed=7)
    return token_ids(run_engine(engine, prompts, GREEDY))


def _prompts(engine_vocab: int) -> list[list[int]]:
    return random_prompts(engine_vocab, LENGTHS, seed=7)


@pytest.mark.parametrize("cache_mode", ["contiguous", "none"])
def test_cache_modes_agree_with_paged(
    llama: str, reference: list[list[int]], cache_mode: str
) -> None:
    engine = make_engine(llama, cache_mode=cache_mode, num_kv_blocks=8 * 16 + 1)
    outputs = run_engine(engine, _prompts(engine.model_config.vocab_size), GREEDY)
    assert token_ids(outputs) == reference


@pytest.mark.parametrize(
    ("name", "kv_cache_dtype"),
    [
        ("llama", "auto"),
        ("llama", "bfloat16"),
        ("llama", "int8"),
        ("mistral", "auto"),  # sliding window 8
        ("qwen2_swa", "auto"),  # one full layer, one windowed
    ],
)
def test_attention_backends_agree(
    tiny_checkpoints: dict[str, str], name: str, kv_cache_dtype: str
) -> None:
    """Decode attention in kvserve's C++ kernel (on every x86 CPU this project runs on) and
    in torch (gather + SDPA) over the same cache: same tokens, logprobs within 1e-4."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    outputs = []
    for backend in ("auto", "torch"):
        engine = make_engine(
            tiny_checkpoints[name], kv_cache_dtype=kv_cache_dtype, attention_backend=backend
        )
        expected = backend == "auto" and decode_kernel_expected()
        assert (engine.model_runner.attention_backend.name == "cpp") == expected
        outputs.append(run_engine(engine, _prompts(engine.model_config.vocab_size), params))
    kernel, torch_path = outputs
    assert token_ids(kernel) == token_ids(torch_path)
    for got, want in zip(kernel, torch_path, strict=True):
        for got_step, want_step in zip(
            got.outputs[0].logprobs or [], want.outputs[0].logprobs or [], strict=True
        ):
            for token_id, logprob in want_step.items():
                assert got_step[token_id].logprob == pytest.approx(logprob.logprob, abs=1e-4)


def test_chunked_prefill_budget_7_equals_whole(llama: str, reference: list[list[int]]) -> None:
    engine = make_engine(llama, max_num_batched_tokens=7)
    outputs = run_engine(engine, _prompts(engine.model_config.vocab_size), GREEDY)
    assert token_ids(outputs) == reference


@pytest.mark.parametrize("block_size", [1, 32])
def test_block_sizes_agree(llama: str, reference: list[list[int]], block_size: int) -> None:
    engine = make_engine(llama, block_size=block_size, num_kv_blocks=2048 // block_size)
    outputs = run_engine(engine, _prompts(engine.model_config.vocab_size), GREEDY)
    assert token_ids(outputs) == reference


def test_alone_equals_in_batch_of_8(llama: str, reference: list[list[int]]) -> None:
    engine = make_engine(llama)
    prompts = _prompts(engine.model_config.vocab_size)
    for index, prompt in enumerate(prompts):
        assert token_ids(run_engine(engine, [prompt], GREEDY)) == [reference[index]]


def test_preemption_keeps_outputs_identical(llama: str, reference: list[list[int]]) -> None:
    # 88 tokens is the longest sequence (64 + 24); 8 sequences need far more than 12 blocks.
    engine = make_engine(llama, num_kv_blocks=12, block_size=16, max_model_len=128,
                         enable_prefix_caching=False)  # fmt: skip
    outputs = run_engine(engine, _prompts(engine.model_config.vocab_size), GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert token_ids(outputs) == reference


def test_abort_frees_blocks_and_engine_keeps_serving(
    llama: str, reference: list[list[int]]
) -> None:
    engine = make_engine(llama)
    prompts = _prompts(engine.model_config.vocab_size)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"a{index}", {"prompt_token_ids": prompt}, GREEDY)
    for _ in range(3):
        engine.step()
        engine.scheduler.check_invariants()
    for index in range(len(prompts)):
        engine.abort_request(f"a{index}")
    engine.scheduler.check_invariants()
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache_manager.num_used_blocks == 0
    assert token_ids(run_engine(engine, prompts[:2], GREEDY)) == reference[:2]
