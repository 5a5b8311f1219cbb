"""A real headless browser for the web pages' tests: Debian's chromium driven by Playwright
(its Python package only; nothing is downloaded: `playwright install` is never run).

`make test` and `.ci/run` install chromium (`make chromium`); a machine without it skips
the browser tests, saying so, except under CI, where it fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import pytest

FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


TIMEOUT_S = 120  # for every wait: generous, a loaded machine is slow, never wrong


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian's chromium is not installed (make chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class Page:
    """A page and what it logged: console errors, uncaught exceptions, and every host it
    asked for (a page that needs a CDN would show another host)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.hosts: set[str] = set()
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("request", lambda r: self.hosts.add(urlparse(r.url).hostname or r.url))


@contextmanager
def browser_page(**context_args: Any) -> Iterator[Page]:
    """A fresh headless chromium page (`context_args`: Playwright's new_context's, e.g.
    `http_credentials`)."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000}, **context_args)
            context.set_default_timeout(1000 * TIMEOUT_S)
            yield Page(context.new_page())
        finally:
            browser.close()
