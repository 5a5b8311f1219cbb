"""Sampling semantics through the whole engine: seeds, n, stop tokens, min_tokens."""

from __future__ import annotations

import pytest

from kvserve.sampling_params import SamplingParams
from tests.helpers import make_engine, random_prompts, run_engine, token_ids

SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, ignore_eos=True, seed=1234)


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


def test_same_seed_same_tokens_whatever_the_batch(llama: str) -> None:
    engine = make_engine(llama)
    prompts = random_prompts(engine.model_config.vocab_size, [9, 30, 4, 17, 22], seed=2)
    alone = token_ids(run_engine(engine, prompts[:1], SAMPLED))
    others = [SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)] * 4
    batched = token_ids(run_engine(engine, prompts, [SAMPLED, *others]))
    assert batched[0] == alone[0]
    different_seed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, ignore_eos=True,
                                    seed=99)  # fmt: skip
    assert token_ids(run_engine(engine, prompts[:1], different_seed)) != alone


def test_n_equals_separate_requests_with_derived_seeds(llama: str) -> None:
    engine = make_engine(llama)
    prompt = random_prompts(engine.model_config.vocab_size, [21], seed=4)[0]
    fanned = run_engine(engine, [prompt], SAMPLED.replace(n=4))[0]
    assert [c.index for c in fanned.outputs] == [0, 1, 2, 3]
    separate = [
        token_ids(run_engine(engine, [prompt], SAMPLED.replace(seed=SAMPLED.seed + i)))[0]  # type: ignore[operator]
        for i in range(4)
    ]
    assert [c.token_ids for c in fanned.outputs] == separate
    assert len({tuple(ids) for ids in separate}) > 1


def test_stop_token_ids_and_min_tokens(llama: str) -> None:
    engine = make_engine(llama)
    prompt = random_prompts(engine.model_config.vocab_size, [12], seed=5)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reference = token_ids(run_engine(engine, [prompt], greedy))[0]
    stop_at = reference[5]
    first = reference.index(stop_at)
    out = run_engine(engine, [prompt], greedy.replace(stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == reference[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # min_tokens masks the stop token until enough tokens exist, so the text changes but
    # the length is at least min_tokens.
    out = run_engine(engine, [prompt], greedy.replace(stop_token_ids=[stop_at], min_tokens=8))
    completion = out[0].outputs[0]
    assert len(completion.token_ids) >= 8
    assert stop_at not in completion.token_ids[:7]


def test_max_tokens_finishes_with_length(llama: str) -> None:
    engine = make_engine(llama)
    prompt = random_prompts(engine.model_config.vocab_size, [7], seed=6)[0]
    out = run_engine(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=5,
                                                      ignore_eos=True))[0]  # fmt: skip
    assert len(out.outputs[0].token_ids) == 5
    assert out.outputs[0].finish_reason == "length"
    assert out.finished and out.prompt_token_ids == prompt


def test_logit_bias_forces_a_token_through_the_engine(llama: str) -> None:
    """+100 on one token: every output token is it, greedy and sampled; its logprob stays
    raw: equal to what prompt logprobs say of the same token after the same prompt."""
    engine = make_engine(llama)
    prompt = random_prompts(engine.model_config.vocab_size, [10], seed=6)[0]
    for base in (SamplingParams(temperature=0.0), SAMPLED):
        params = base.replace(max_tokens=5, ignore_eos=True, logit_bias={42: 100.0})
        assert token_ids(run_engine(engine, [prompt], params)) == [[42] * 5]
    greedy = SamplingParams(temperature=0.0, max_tokens=1, logprobs=0)
    (biased,) = run_engine(engine, [prompt], greedy.replace(logit_bias={42: 100.0}))
    (scored,) = run_engine(engine, [[*prompt, 42]], greedy.replace(prompt_logprobs=0))
    assert biased.outputs[0].token_ids == [42]
    assert biased.outputs[0].logprobs is not None and scored.prompt_logprobs is not None
    raw = scored.prompt_logprobs[-1]
    assert raw is not None and raw[42].rank > 1  # not the model's own choice
    assert biased.outputs[0].logprobs[0][42].logprob == pytest.approx(raw[42].logprob, abs=1e-5)
    assert biased.outputs[0].logprobs[0][42].rank == raw[42].rank
