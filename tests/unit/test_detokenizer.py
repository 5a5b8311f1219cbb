"""Incremental detokenizer: deltas add up to `decode`, never split a character, and never
stream any part of a stop string."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.sampling_params import SamplingParams

SENTENCES = [
    "Hello world, this is a small test of streaming text.",
    "The KV cache stores keys and values, never queries.",
    "Emoji are four bytes: 😀 🚀 👍🏽 and 🇫🇷 flags.",
    "中文也可以：你好，世界！我们测试增量解码。",
    "Mixed: café naïve résumé, 日本語のテキスト, and ünïcödé.",
    "Stop strings like ### or END should cut the text.",
]


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here; small, so many characters stay split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def default_tokenizer() -> Any:
    from kvserve.default_model import resolve_default_model
    from kvserve.tokenizer import load_tokenizer

    return load_tokenizer(resolve_default_model())


class DecodeOnly:
    """A tokenizer without a Rust backend: forces the prefix/read-offset algorithm."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _stream(
    tokenizer: Any,
    prompt: list[int],
    output: list[int],
    params: SamplingParams,
    rng: random.Random,
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed `output` in random chunks, taking deltas at random moments."""
    detok = IncrementalDetokenizer(tokenizer, prompt, params)
    deltas: list[str] = []
    i = 0
    while i < len(output) and detok.stop_reason is None:
        n = rng.randint(1, 3)
        detok.update(output[i : i + n])
        i += n
        if rng.random() < 0.7:
            deltas.append(detok.get_delta(finished=False))
    deltas.append(detok.get_delta(finished=True))
    return detok, deltas


def _check_random_sequences(tokenizer: Any, num: int, seed: int, reference: Any = None) -> None:
    """Random token sequences (valid text or arbitrary ids) streamed against `decode`."""
    rng = random.Random(seed)
    reference = reference or tokenizer
    text_prompt = reference.encode("Tell me something:", add_special_tokens=False)
    vocab = len(reference)
    for _ in range(num):
        skip = rng.random() < 0.5
        # Arbitrary prompts may end inside a character; the output text must not care.
        prompt = text_prompt if rng.random() < 0.5 else [rng.randrange(vocab) for _ in range(9)]
        params = SamplingParams(skip_special_tokens=skip)
        if rng.random() < 0.5:
            text = " ".join(rng.sample(SENTENCES, 2))
            output = reference.encode(text, add_special_tokens=False)
        else:
            output = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        detok, deltas = _stream(tokenizer, prompt, output, params, rng)
        full = reference.decode(output, skip_special_tokens=skip)
        assert "".join(deltas) == full == detok.output_text
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


def test_deltas_add_up_to_decode(bpe_tokenizer) -> None:
    _check_random_sequences(bpe_tokenizer, num=300, seed=0)


def test_offset_algorithm_for_tokenizers_without_backend(bpe_tokenizer) -> None:
    _check_random_sequences(DecodeOnly(bpe_tokenizer), num=150, seed=1, reference=bpe_tokenizer)


def test_multibyte_characters_are_never_split(bpe_tokenizer) -> None:
    ids = bpe_tokenizer.encode("🚀👍🏽 你好，世界！", add_special_tokens=False)
    assert len(ids) > 8  # characters really span several tokens
    detok = IncrementalDetokenizer(bpe_tokenizer, [], SamplingParams())
    pieces = []
    for token in ids:
        detok.update([token])
        pieces.append(detok.get_delta(finished=False))
    assert "".join(pieces) == "🚀👍🏽 你好，世界！"
    assert "" in pieces and not any("\ufffd" in p for p in pieces)


def _stop_across_tokens(tokenizer: Any, text: str) -> tuple[list[int], str]:
    """Token ids of `text` and a 4-character stop string spanning a token boundary."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    for i in range(1, len(ids)):
        head = tokenizer.decode(ids[:i])
        if len(head) >= 8 and "\ufffd" not in head and len(text) - len(head) >= 2:
            stop = text[len(head) - 2 : len(head) + 2]
            if text.find(stop) == len(head) - 2 and stop.strip() == stop:
                return ids, stop
    raise AssertionError("no boundary found")


def test_stop_string_spanning_two_tokens_is_cut_and_never_streamed(bpe_tokenizer) -> None:
    text = "Hello world, this is a small test of streaming text."
    ids, stop = _stop_across_tokens(bpe_tokenizer, text)
    expected = text[: text.index(stop)]
    assert len(expected) >= 6
    params = SamplingParams(stop=["never there", stop])
    detok = IncrementalDetokenizer(bpe_tokenizer, [1, 2], params)
    streamed, reason = "", None
    for token in ids:
        reason = detok.update([token])
        streamed += detok.get_delta(finished=reason is not None)
        assert expected.startswith(streamed)  # nothing of the stop string leaks
        if reason is not None:
            break
    assert reason == stop and detok.stop_reason == stop
    assert detok.output_text == expected == streamed
    assert detok.get_delta(finished=True) == ""


def test_earliest_stop_string_wins(bpe_tokenizer) -> None:
    text = "Stop strings like ### or END should cut the text."
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(bpe_tokenizer, [], SamplingParams(stop=["END", "like"]))
    assert detok.update(ids) == "like"
    assert detok.output_text == "Stop strings "
    assert detok.update(ids) is None and detok.output_text == "Stop strings "


def test_holdback_only_while_unfinished(bpe_tokenizer) -> None:
    ids = bpe_tokenizer.encode("Hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(bpe_tokenizer, [], SamplingParams(stop=["12345"]))
    detok.update(ids)
    assert detok.get_delta(finished=False) == "Hello w"  # 4 characters held back
    assert detok.get_delta(finished=False) == ""
    assert detok.get_delta(finished=True) == "orld"


def test_skip_special_tokens(bpe_tokenizer) -> None:
    ids = bpe_tokenizer.encode("Hello", add_special_tokens=False) + [2]
    for skip, text in ((True, "Hello"), (False, "Hello<|im_end|>")):
        detok = IncrementalDetokenizer(bpe_tokenizer, [], SamplingParams(skip_special_tokens=skip))
        detok.update(ids)
        assert detok.get_delta(finished=True) == text


def test_no_tokenizer_means_no_text() -> None:
    detok = IncrementalDetokenizer(None, [1, 2, 3], SamplingParams(stop=["a"]))
    assert detok.update([4, 5]) is None
    assert detok.output_text == "" and detok.get_delta(finished=True) == ""
    assert detok.token_ids == [4, 5]


@pytest.mark.slow
def test_default_tokenizer_deltas_add_up(default_tokenizer) -> None:
    _check_random_sequences(default_tokenizer, num=200, seed=2)


@pytest.mark.slow
def test_default_tokenizer_chat_prompt_and_stop(default_tokenizer) -> None:
    from kvserve.tokenizer import apply_chat_template

    prompt = apply_chat_template(default_tokenizer, [{"role": "user", "content": "Hi 😀"}])
    text = "Sure! 你好 🚀 The answer is 42.\nDone."
    output = default_tokenizer.encode(text, add_special_tokens=False) + [2]
    detok = IncrementalDetokenizer(default_tokenizer, prompt, SamplingParams(stop=["\nDone"]))
    streamed = ""
    for token in output:
        if detok.update([token]) is not None:
            break
        streamed += detok.get_delta(finished=False)
    assert detok.stop_reason == "\nDone"
    assert streamed + detok.get_delta(finished=True) == "Sure! 你好 🚀 The answer is 42."


def test_load_tokenizer_and_chat_template(bpe_tokenizer, tmp_path) -> None:
    from kvserve.tokenizer import apply_chat_template, encode_prompt, load_tokenizer

    assert load_tokenizer(str(tmp_path)) is None  # a folder without tokenizer files
    bpe_tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert encode_prompt(loaded, "Hello 😀") == bpe_tokenizer.encode("Hello 😀")
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="chat template"):
        apply_chat_template(loaded, messages)
    loaded.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ids = apply_chat_template(loaded, messages)
    assert ids.count(1) == 2 and ids.count(2) == 1  # special tokens written once, not added
    assert loaded.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
