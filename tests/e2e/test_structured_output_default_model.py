"""Structured output on the default SmolLM2-135M-Instruct: greedy JSON that validates."""

from __future__ import annotations

import json

import pytest

from kvserve import LLM, SamplingParams, StructuredOutputParams
from tests.invariance.test_structured_output_engine import check_schema

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "kind": {"enum": ["home", "work"]},
            },
            "required": ["city", "kind"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}


def test_greedy_json_schema_on_the_default_model() -> None:
    llm = LLM(max_model_len=512)
    message = "Describe a fictional person as JSON: name, age, address (city, kind home or work)."
    params = SamplingParams(
        temperature=0.0, max_tokens=200, structured_output=StructuredOutputParams(json=SCHEMA)
    )
    prompt = llm.chat_prompt([{"role": "user", "content": message}])
    completion = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "stop"
    value = json.loads(completion.text)
    check_schema(value, SCHEMA)
    assert value["name"]  # a real model fills the string, not just the braces
    free = SamplingParams(temperature=0.0, max_tokens=40)
    assert llm.generate([prompt], free, use_tqdm=False)[0].outputs[0].text != completion.text
