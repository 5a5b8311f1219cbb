"""Fixtures shared by the server tests: tiny checkpoints made once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.tiny_tokenizer import save_tiny_tokenizer


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
    """A tiny random llama with a tokenizer (tests/tiny_tokenizer.py) and a ChatML template:
    text prompts and chat messages run end to end."""
    root = tmp_path_factory.mktemp("tiny_chat")
    folder = Path(make_tiny_checkpoint("llama", root, vocab_size=VOCAB_SIZE))
    save_tiny_tokenizer(folder, chat_template=CHATML)
    return folder
