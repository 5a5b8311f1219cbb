"""The KV inspector under load, as a PNG for the docs (docs/img/kv_inspector.png).

Start a server first, e.g. `kvserve serve --port 8000 --kv-inspector-show-text`; this script
sends chats that share a system prompt (prefix hits), some with `n=2` (forked samples share
their prompt's blocks), opens /kv in Debian's chromium (Playwright, no browser download),
selects a two-sample request, pins a shared block and takes the screenshot.

    python scripts/inspector_screenshot.py --base-url http://127.0.0.1:8000 --out kv.png
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time

import httpx
from playwright.sync_api import sync_playwright

SYSTEM = (
    "You are a patient teacher who explains how large language model servers manage their "
    "memory: the KV cache, paged blocks, prefix sharing and what happens under load. " * 4
)
QUESTIONS = [
    "Why are keys and values cached but not queries?",
    "What is paged attention?",
    "Explain prefix caching with an example.",
    "What do grouped-query attention and multi-query attention save?",
    "Why quantize the KV cache to int8?",
    "What does a sliding window do to the cache?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", default="docs/img/kv_inspector.png")
    parser.add_argument("--num-requests", type=int, default=10)
    parser.add_argument("--settle-s", type=float, default=8.0, help="load before the shot")
    args = parser.parse_args()
    model = httpx.get(f"{args.base_url}/v1/models").json()["data"][0]["id"]

    def chat(index: int) -> None:
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]},
            ],
            "max_tokens": 400,
            "n": 2 if index % 3 == 0 else 1,
            "temperature": 0.8,
        }
        httpx.post(f"{args.base_url}/v1/chat/completions", json=body, timeout=600)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(args.num_requests)]
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (make chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{args.base_url}/kv")
        for thread in threads:
            thread.start()
            time.sleep(0.4)
        time.sleep(args.settle_s)
        page.locator('#requests tr[data-request-id$="#0"]').first.click()
        page.locator("#grid .blk.sel.shared").first.click()
        page.wait_for_timeout(800)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    for thread in threads:
        thread.join()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
