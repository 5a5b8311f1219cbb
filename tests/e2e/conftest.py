"""Fixtures shared by the server tests: tiny checkpoints made once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_llama(make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama, 128 positions, no tokenizer."""
    return Path(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny_llama")))


VOCAB_SIZE = 320
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_llama(make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama with a tokenizer (byte-level BPE trained here, 300 tokens) and a
    ChatML template: text prompts and chat messages run end to end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world, a tiny model says hi"] * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=CHATML,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("tiny_chat")
    folder = Path(make_tiny_checkpoint("llama", root, vocab_size=VOCAB_SIZE))
    assert len(tokenizer) <= VOCAB_SIZE  # every id is one the model can embed
    tokenizer.save_pretrained(folder)
    return folder
