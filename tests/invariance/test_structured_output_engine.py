"""Structured output through the whole engine: valid output for every kind, greedy and sampled,
n > 1, chunked prefill and preemption (same tokens as without), bad constraints before any work,
and a failing matcher that ends only its own request."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kvserve.engine.engine import Engine
from kvserve.engine.sampler import SamplerOutput
from kvserve.sampling_params import SamplingParams, StructuredOutputParams
from tests.conftest import make_tiny_checkpoint
from tests.helpers import assert_no_blocks_held, make_engine, random_prompts, run_engine
from tests.tiny_tokenizer import EOS_TOKEN_ID, save_tiny_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {
            "type": "object",
            "properties": {
                "kind": {"enum": ["cat", "dog", "fish"]},
                "vaccinated": {"type": "boolean"},
            },
            "required": ["kind", "vaccinated"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
SIZES = {
    "type": "array",
    "items": {"enum": ["S", "M", "L", 1, 2, None]},
    "minItems": 1,
    "maxItems": 4,
}
SHIRT = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "sizes": SIZES,
        "in_stock": {"type": "boolean"},
    },
    "required": ["color", "sizes", "in_stock"],
    "additionalProperties": False,
}
SCHEMAS = [PERSON, SIZES, SHIRT]


def check_schema(value: Any, schema: dict[str, Any]) -> None:
    """Assert that `value` satisfies the subset of JSON schema used above."""
    if "enum" in schema:
        assert value in schema["enum"] and type(value) in {type(e) for e in schema["enum"]}
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict)
        assert set(value) == set(schema["required"]) == set(schema["properties"])
        for key, sub in schema["properties"].items():
            check_schema(value[key], sub)
    elif kind == "array":
        assert isinstance(value, list)
        assert schema["minItems"] <= len(value) <= schema["maxItems"]
        for item in value:
            check_schema(item, schema["items"])
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool)
        assert schema["minimum"] <= value <= schema["maximum"]
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema["maxLength"]
    else:
        assert kind == "boolean" and isinstance(value, bool)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny llama with a real tokenizer; vocab 320 > the tokenizer's 300 (padded ids)."""
    root: Path = tmp_path_factory.mktemp("tokenized")
    folder = make_tiny_checkpoint("llama", root, vocab_size=320, eos_token_id=0, bos_token_id=0)
    save_tiny_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def engine(model: str) -> Engine:
    return make_engine(model)


def _json(schema: dict[str, Any], **kwargs: Any) -> SamplingParams:
    kwargs.setdefault("max_tokens", 100)
    return SamplingParams(structured_output=StructuredOutputParams(json=schema), **kwargs)


PROMPTS = random_prompts(300, [5, 9, 14], seed=3)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "sizes", "shirt"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_json_schema_output_parses_and_validates(
    engine: Engine, schema: dict[str, Any], temperature: float
) -> None:
    params = _json(schema, temperature=temperature, seed=11)
    outputs = run_engine(engine, PROMPTS, params)
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        check_schema(json.loads(completion.text), schema)
        assert EOS_TOKEN_ID not in completion.token_ids  # the grammar ended it, not EOS
    assert engine.structured_output.num_requests == 0
    assert [o.outputs[0].token_ids for o in run_engine(engine, PROMPTS, params)] == [
        o.outputs[0].token_ids for o in outputs
    ]


def test_n_samples_equal_separate_requests_with_derived_seeds(engine: Engine) -> None:
    params = _json(SHIRT, temperature=1.0, seed=5, n=4)
    fanned = run_engine(engine, PROMPTS[:1], params)[0].outputs
    separate = [
        run_engine(engine, PROMPTS[:1], params.replace(n=1, seed=5 + i))[0].outputs[0]
        for i in range(4)
    ]
    assert [c.token_ids for c in fanned] == [c.token_ids for c in separate]
    for completion in fanned:
        check_schema(json.loads(completion.text), SHIRT)
    assert len({c.text for c in fanned}) > 1


def test_chunked_prefill_and_preemption_give_the_same_tokens(model: str, engine: Engine) -> None:
    prompts = random_prompts(300, [30, 27, 35, 23], seed=8)
    params = [_json(PERSON, temperature=t, seed=2, max_tokens=60) for t in (0.0, 1.0, 0.0, 1.0)]
    reference = run_engine(engine, prompts, params)
    small = make_engine(model, num_kv_blocks=17, block_size=8, max_num_batched_tokens=16)
    squeezed = run_engine(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in squeezed] == [o.outputs[0].token_ids for o in reference]
    for output in squeezed:
        check_schema(json.loads(output.outputs[0].text), PERSON)


def test_json_object_regex_choice_and_grammar(engine: Engine) -> None:
    pattern = r"[a-c]{2,5}-[0-9]{1,3}"
    choices = ["yes", "no", "so so"]
    kinds = [
        (StructuredOutputParams(regex=pattern), lambda t: re.fullmatch(pattern, t)),
        (StructuredOutputParams(choice=choices), lambda t: t in choices),
        (
            StructuredOutputParams(grammar='start: "(" D ("," D)~0..3 ")"\nD: /[0-9]/'),
            lambda t: re.fullmatch(r"\([0-9](,[0-9]){0,3}\)", t),
        ),
    ]  # fmt: skip
    for so, matches in kinds:
        for temperature in (0.0, 1.0):
            params = SamplingParams(
                temperature=temperature, seed=4, max_tokens=40, structured_output=so
            )
            for output in run_engine(engine, PROMPTS, params):
                completion = output.outputs[0]
                assert completion.finish_reason == "stop" and matches(completion.text), so
    # A random model rambles inside strings: whatever finished is one JSON object.
    params = SamplingParams(
        temperature=1.0,
        seed=1,
        max_tokens=100,
        structured_output=StructuredOutputParams(json_object=True),
    )
    outputs = [
        o.outputs[0] for o in run_engine(engine, random_prompts(300, [6] * 12, seed=1), params)
    ]
    assert any(c.finish_reason == "stop" for c in outputs)
    for completion in outputs:
        assert completion.text.startswith("{")
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)


@pytest.mark.parametrize(
    ("so", "field"),
    [
        (StructuredOutputParams(json={"properties": {"a": {"type": "no"}}}), "json"),
        (StructuredOutputParams(json={"type": "string", "format": "no-such-format"}), "json"),
        (StructuredOutputParams(regex="[a-"), "regex"),
        (StructuredOutputParams(grammar="start: missing"), "grammar"),
    ],
)  # fmt: skip
def test_bad_constraint_raises_before_any_work(
    engine: Engine, so: StructuredOutputParams, field: str
) -> None:
    with pytest.raises(ValueError, match=rf"^structured_output\.{field}: "):
        engine.add_request(
            "bad", {"prompt_token_ids": [5, 6]}, SamplingParams(structured_output=so)
        )
    assert not engine.has_unfinished_requests()
    assert not engine.output_processor.has_request("bad")
    assert engine.structured_output.num_requests == 0
    assert_no_blocks_held(engine)


def test_model_without_tokenizer_is_a_value_error(tiny_checkpoints: dict[str, Path]) -> None:
    engine = make_engine(str(tiny_checkpoints["llama"]))
    params = SamplingParams(structured_output=StructuredOutputParams(regex="[0-9]+"))
    with pytest.raises(ValueError, match=r"^structured_output: "):
        engine.add_request("r", {"prompt_token_ids": [5, 6]}, params)
    assert not engine.has_unfinished_requests()


def test_failing_matcher_aborts_only_its_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token the grammar rejects (here forced past the mask) ends that request as "abort",
    frees its blocks and matcher; the other requests of the step go on unchanged."""
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = run_engine(engine, PROMPTS[:1], free)[0].outputs[0].token_ids
    sampler = engine.model_runner.sampler
    original = sampler.__call__

    def forced(logits: Any, requests: Any, grammar_bitmask: Any = None) -> SamplerOutput:
        result = original(logits, requests, grammar_bitmask)
        ids = [
            299 if r.request_id == "digits" else t
            for r, t in zip(requests, result.token_ids, strict=True)
        ]
        return SamplerOutput(ids, result.logprobs)

    monkeypatch.setattr(type(sampler), "__call__", lambda self, *a: forced(*a))
    digits = SamplingParams(max_tokens=8, structured_output=StructuredOutputParams(regex="[0-9]+"))
    engine.add_request("digits", {"prompt_token_ids": PROMPTS[1]}, digits)
    engine.add_request("free", {"prompt_token_ids": PROMPTS[0]}, free)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0]
        engine.scheduler.check_invariants()
    assert finished["digits"].finish_reason == "abort"
    assert finished["digits"].token_ids == [299]
    assert finished["free"].token_ids == expected
    assert engine.structured_output.num_requests == 0
    assert_no_blocks_held(engine)


def test_abort_and_stop_string_free_the_matcher(engine: Engine) -> None:
    params = _json(PERSON, temperature=1.0, seed=3)
    engine.add_request("aborted", {"prompt_token_ids": PROMPTS[0]}, params)
    engine.add_request("stopped", {"prompt_token_ids": PROMPTS[1]}, params.replace(stop=['"age"']))
    engine.step()
    engine.abort_request("aborted")
    assert engine.structured_output.num_requests == 1
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert (
        outputs[0].outputs[0].finish_reason == "stop"
        and outputs[0].outputs[0].stop_reason == '"age"'
    )
    assert engine.structured_output.num_requests == 0
    assert_no_blocks_held(engine)
