"""Text-level features on the default model: stop strings, streaming, the chat CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvserve import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512)


def test_stop_string_is_cut_and_reported(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    text = llm.generate(["Count: one, two, three,"], greedy, use_tqdm=False)[0].outputs[0].text
    words = text.split()
    assert len(words) > 3
    stop = words[2]
    out = llm.generate(["Count: one, two, three,"], greedy.replace(stop=[stop]), use_tqdm=False)
    completion = out[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == text[: text.index(stop)]


def test_streamed_text_equals_final_text(llm: LLM) -> None:
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=24)
    outputs = list(llm.generate_stream("Write a haiku about memory:", params))
    final = outputs[-1].outputs[0]
    assert outputs[-1].finished
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert lengths == sorted(lengths) and lengths[-1] == len(final.token_ids)
    assert final.text == llm.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    assert llm.engine.kv_cache_manager.num_used_blocks == 0


def test_multi_prompt_order_and_logprobs(llm: LLM) -> None:
    prompts = ["The sky is", "One plus one equals", "Paris is the capital of"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))
    assert [o.prompt for o in outs] == prompts
    for out in outs:
        completion = out.outputs[0]
        assert completion.logprobs is not None and len(completion.logprobs) == 4
        for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=True):
            assert entry[token_id].rank == 1  # greedy picks the most likely token


def test_chat_cli_streams_two_turns() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvserve", "chat", "--max-tokens", "12", "--max-model-len", "512"],
        input="Say hello.\nNow say goodbye.\n\n",
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    assert result.stderr.count("tokens in") == 2
    assert result.stdout.strip()
