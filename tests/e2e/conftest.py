"""Fixtures shared by the server tests: tiny checkpoints made once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_llama(make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama, 128 positions, no tokenizer."""
    return Path(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny_llama")))
