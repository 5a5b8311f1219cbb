"""Continuing a request from tokens another engine generated (engine/continuation.py): the
decode side of prefill/decode disaggregation. A request run to its first token on one engine
and continued on another gives what one engine gives alone: the same tokens (greedy and
seeded, n > 1, penalties, structured output), text and logprobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve.engine.continuation import ContinuedSample
from kvserve.engine.engine import Engine
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams, StructuredOutputParams
from tests.conftest import make_tiny_checkpoint
from tests.helpers import assert_no_blocks_held, make_engine, random_prompts
from tests.tiny_tokenizer import save_tiny_tokenizer

PROMPTS = random_prompts(300, [5, 23, 40], seed=5)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny llama with a tokenizer (text, stop strings, structured output)."""
    root: Path = tmp_path_factory.mktemp("continuation")
    folder = make_tiny_checkpoint("llama", root, vocab_size=320, eos_token_id=0, bos_token_id=0)
    save_tiny_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def prefill(model: str) -> Engine:
    return make_engine(model)


@pytest.fixture(scope="module")
def decode(model: str) -> Engine:
    return make_engine(model)


def run(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams,
        continue_from: list[ContinuedSample] | None = None) -> RequestOutput:  # fmt: skip
    engine.add_request(request_id, prompt, params, continue_from=continue_from)
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            final = output
        engine.kv_cache_manager.check_invariants()
    assert final is not None and final.finished
    assert_no_blocks_held(engine)
    return final


def first_tokens(prefill: Engine, request_id: str, prompt: list[int], params: SamplingParams,
                 num_tokens: int = 1) -> tuple[RequestOutput, list[ContinuedSample]]:  # fmt: skip
    """Run the request to its first `num_tokens` tokens: its output, and the samples to
    continue (those that did not end there)."""
    head_params = params.replace(
        max_tokens=num_tokens, min_tokens=min(params.min_tokens, num_tokens)
    )
    head = run(prefill, request_id, prompt, head_params)
    return head, [
        ContinuedSample(o.index, o.token_ids, o.logprobs, o.cumulative_logprob or 0.0)
        for o in head.outputs
        if o.finish_reason == "length"
    ]


PARAMS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=16, logprobs=3),
    "seeded": SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, logprobs=2),
    "n=3": SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=12),
    "penalties": SamplingParams(
        temperature=0.0, max_tokens=16, repetition_penalty=1.3, presence_penalty=0.5, min_tokens=8
    ),
}


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("num_carried", [1, 3])
def test_continued_requests_equal_one_engine(
    prefill: Engine, decode: Engine, name: str, num_carried: int
) -> None:
    params = PARAMS[name]
    for index, prompt in enumerate(PROMPTS):
        whole = run(decode, f"whole-{name}-{index}", prompt, params)
        head, samples = first_tokens(prefill, f"head-{name}", prompt, params, num_carried)
        ended = [o for o in head.outputs if o.finish_reason != "length"]
        if samples:
            continued = run(decode, f"cont-{name}-{index}", prompt, params, samples)
            ended += continued.outputs
        for expected, got in zip(whole.outputs, sorted(ended, key=lambda o: o.index), strict=True):
            assert got.index == expected.index
            assert got.token_ids == expected.token_ids
            assert got.text == expected.text
            assert got.finish_reason == expected.finish_reason
            if expected.logprobs is not None:
                assert got.logprobs is not None
                assert [set(e) for e in got.logprobs] == [set(e) for e in expected.logprobs]
                for a, b in zip(got.logprobs, expected.logprobs, strict=True):
                    for token_id in a:
                        assert a[token_id].logprob == pytest.approx(b[token_id].logprob, abs=1e-4)


def test_a_subset_of_samples_continues_under_its_own_index_and_seed(
    prefill: Engine, decode: Engine
) -> None:
    params = SamplingParams(temperature=1.0, seed=21, n=4, max_tokens=10)
    whole = run(decode, "whole-subset", PROMPTS[1], params)
    _, samples = first_tokens(prefill, "head-subset", PROMPTS[1], params)
    assert len(samples) == 4
    continued = run(decode, "cont-subset", PROMPTS[1], params, [samples[1], samples[3]])
    assert [o.index for o in continued.outputs] == [1, 3]
    assert [o.token_ids for o in continued.outputs] == [
        whole.outputs[1].token_ids,
        whole.outputs[3].token_ids,
    ]


def test_structured_output_continues_past_the_carried_tokens(
    prefill: Engine, decode: Engine
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    params = SamplingParams(
        temperature=0.0, max_tokens=40, structured_output=StructuredOutputParams(json=schema)
    )
    whole = run(decode, "whole-json", PROMPTS[0], params)
    _, samples = first_tokens(prefill, "head-json", PROMPTS[0], params, 2)
    continued = run(decode, "cont-json", PROMPTS[0], params, samples)
    assert continued.outputs[0].token_ids == whole.outputs[0].token_ids
    assert json.loads(continued.outputs[0].text) == json.loads(whole.outputs[0].text)
    assert decode.structured_output.num_requests == 0


@pytest.mark.parametrize(
    ("samples", "params", "message"),
    [
        ([], SamplingParams(max_tokens=4), "at least one sample"),
        ([ContinuedSample(1, [5])], SamplingParams(max_tokens=4), r"indices must be .* \[0, 1\)"),
        (
            [ContinuedSample(0, [5]), ContinuedSample(0, [6])],
            SamplingParams(n=2, max_tokens=4),
            "distinct",
        ),  # fmt: skip
        ([ContinuedSample(0, [])], SamplingParams(max_tokens=4), "1 to max_tokens - 1"),
        ([ContinuedSample(0, [5, 6, 7, 8])], SamplingParams(max_tokens=4), "1 to max_tokens"),
        ([ContinuedSample(0, [999])], SamplingParams(max_tokens=4), "outside"),
        ([ContinuedSample(0, [5])], SamplingParams(max_tokens=4, logprobs=1), "logprob entries"),
    ],
)
def test_bad_continuations_are_refused_before_any_work(
    decode: Engine, samples: list[ContinuedSample], params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError, match=f"continue_from: .*{message}"):
        decode.add_request("bad", PROMPTS[0], params, continue_from=samples)
    assert not decode.has_unfinished_requests()
    assert not decode.output_processor.has_request("bad")
    assert decode.structured_output.num_requests == 0


def test_carried_tokens_that_already_ended_the_sample_are_refused(decode: Engine) -> None:
    eos = min(decode.eos_token_ids)
    for params in (SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, stop_token_ids=[7])):
        ender = eos if not params.stop_token_ids else 7
        with pytest.raises(ValueError, match="continue_from: .*already ended"):
            decode.add_request(
                "ended", PROMPTS[0], params, continue_from=[ContinuedSample(0, [ender])]
            )
    ignoring = SamplingParams(max_tokens=3, ignore_eos=True)
    out = run(decode, "past-eos", PROMPTS[0], ignoring, [ContinuedSample(0, [eos])])
    assert out.outputs[0].token_ids[0] == eos and len(out.outputs[0].token_ids) == 3


def test_carried_tokens_that_already_hold_a_stop_string_are_refused(decode: Engine) -> None:
    text_token = decode.tokenizer.encode("a", add_special_tokens=False)[0]
    params = SamplingParams(max_tokens=8, stop=[decode.tokenizer.decode([text_token])])
    with pytest.raises(ValueError, match="continue_from: .*stop string"):
        decode.add_request(
            "stopped", PROMPTS[0], params, continue_from=[ContinuedSample(0, [text_token])]
        )
    assert not decode.output_processor.has_request("stopped")
    assert not decode.has_unfinished_requests()
