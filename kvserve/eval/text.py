"""The text `kvserve eval ppl` scores: a UTF-8 file, or by default the book of Genesis from
the King James Bible (public domain), read through the `bible` program of Debian's
`bible-kjv` packages (`make eval-deps` installs them)."""

from __future__ import annotations

import re
import shutil
import subprocess

DEFAULT_PASSAGE = "Ge1:1-50:26"  # the book of Genesis, ~50k tokens
_VERSE_REF = re.compile(r"^\S+?\d+:\d+\s+", re.MULTILINE)


def read_text(path: str) -> str:
    """A UTF-8 text file; ValueError naming `text_file` when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as error:
        raise ValueError(f"text_file: {error}") from error


def default_text() -> str:
    """Genesis from Debian's bible-kjv, verse references stripped."""
    program = shutil.which("bible")
    if program is None:
        raise ValueError(
            "text_file: no text given and Debian's bible-kjv is not installed "
            "(`make eval-deps`, or apt-get install bible-kjv-text bible-kjv); "
            "pass --text-file"
        )
    out = subprocess.run(
        [program, "-f", DEFAULT_PASSAGE], check=True, capture_output=True, text=True
    ).stdout
    return _VERSE_REF.sub("", out)
