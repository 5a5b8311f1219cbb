"""`kvserve eval ppl`'s inputs: its window settings and its default text."""

from __future__ import annotations

import shutil

import pytest

from kvserve.eval.perplexity import PplConfig
from kvserve.eval.text import default_text


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window_len": 0}, "window_len"),
        ({"window_len": 1}, "window_len"),
        ({"num_windows": 1.5}, "num_windows"),
        ({"batch_size": True}, "batch_size"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PplConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv: make eval-deps")
def test_default_text_is_genesis_without_verse_references() -> None:
    text = default_text()
    assert text.startswith("In the beginning God created the heaven and the earth.")
    assert "Ge1:1" not in text and "Ge50:26" not in text
    assert text.rstrip().endswith("he was put in a coffin in Egypt.")
    assert 150_000 < len(text) < 250_000
