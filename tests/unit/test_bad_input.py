"""Every bad argument is a ValueError naming the field, raised before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvserve.config import EngineConfig
from kvserve.sampling_params import SamplingParams
from tests.helpers import make_engine, random_prompts, run_engine, token_ids


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_sampling_params_reject(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 12}, "block_size"),
        ({"block_size": 0}, "block_size"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
        ({"cache_mode": "ring"}, "cache_mode"),
        ({"kv_cache_dtype": "int3"}, "kv_cache_dtype"),
        ({"device": "tpu"}, "device"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
    ],
)
def test_engine_config_rejects(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        EngineConfig(**kwargs)  # type: ignore[arg-type]


def test_kv_budget_too_small_for_one_request(tiny_checkpoints: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"^num_kv_blocks:"):
        make_engine(tiny_checkpoints["llama"], num_kv_blocks=4, max_model_len=128)
    with pytest.raises(ValueError, match=r"^kv_cache_memory_bytes:"):
        make_engine(tiny_checkpoints["llama"], num_kv_blocks=None, kv_cache_memory_bytes=1024)


def test_bad_requests_are_rejected_and_engine_keeps_serving(
    tiny_checkpoints: dict[str, str],
) -> None:
    engine = make_engine(tiny_checkpoints["llama"], max_model_len=64)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    good = random_prompts(vocab, [5, 9], seed=3)
    engine.add_request("ok", {"prompt_token_ids": good[0]}, params)
    engine.step()
    cases = [
        ({"prompt_token_ids": []}, params, "prompt_token_ids"),
        ("", params, "prompt"),
        ({"prompt_token_ids": [1, vocab]}, params, "prompt_token_ids"),
        ({"prompt_token_ids": [1, -1]}, params, "prompt_token_ids"),
        ({"prompt_token_ids": [1] * 64}, params, "prompt"),
        ({"prompt_token_ids": [1] * 10}, SamplingParams(max_tokens=60), "max_tokens"),
        ({"text": "x"}, params, "prompt"),
        ({"prompt_token_ids": "1 2"}, params, "prompt_token_ids"),
        ({"prompt_token_ids": [1], "cache_salt": ""}, params, "cache_salt"),
        ({"prompt_token_ids": [1]}, params.replace(logit_bias={vocab: 1.0}), "logit_bias"),
    ]
    for prompt, bad_params, field in cases:
        with pytest.raises(ValueError, match=rf"^{field}:"):
            engine.add_request("bad", prompt, bad_params)
    with pytest.raises(ValueError, match=r"^request_id:"):
        engine.add_request("ok", {"prompt_token_ids": good[1]}, params)
    assert set(engine.scheduler.requests) == {"ok"}
    while engine.has_unfinished_requests():
        engine.step()
        engine.scheduler.check_invariants()
    alone = token_ids(
        run_engine(make_engine(tiny_checkpoints["llama"], max_model_len=64), good[:1], params)
    )
    assert token_ids(run_engine(engine, good[:1], params)) == alone


def test_text_a_tokenizer_cannot_take_is_a_value_error(tmp_path: Path) -> None:
    from kvserve.engine.prompts import tokenize_prompt
    from kvserve.tokenizer import apply_chat_template, load_tokenizer
    from tests.tiny_tokenizer import save_tiny_tokenizer

    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    save_tiny_tokenizer(tmp_path, chat_template=template + "{{ messages[0]['content'] }}")
    tokenizer = load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"^prompt: lone UTF-16 surrogate at character 1"):
        tokenize_prompt(tokenizer, "a\ud800b")
    with pytest.raises(ValueError, match=r"^prompt: lone UTF-16 surrogate"):
        tokenize_prompt(tokenizer, {"prompt": "\udfff", "cache_salt": "t"})
    with pytest.raises(ValueError, match=r"^messages\[1\]\.content: lone UTF-16 surrogate"):
        apply_chat_template(
            tokenizer, [{"role": "user", "content": "ok"}, {"role": "user", "content": "\ud800"}]
        )
    with pytest.raises(ValueError, match=r"^messages: the chat template rejected them: user"):
        apply_chat_template(tokenizer, [{"role": "system", "content": "x"}])
    assert apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}])
