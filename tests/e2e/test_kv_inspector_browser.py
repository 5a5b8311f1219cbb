"""The KV inspector page in a real browser (Debian's chromium, tests/browser.py) against a
real server: the grid shows the used and shared blocks the engine holds, a selected request
outlines exactly its block ids, a pinned block shows its tokens, and the page logs no error
and asks no host but the server. The engine's steps are held (StepGate) while the page is
checked, so what it shows is one known state however fast the machine is."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Error as PlaywrightError

from tests.browser import browser_page
from tests.helpers import make_engine
from tests.server_helpers import gated_inspected_engine, serve_in_thread, wait_for

KEY = "s3cret"
PROMPT = "the quick brown fox jumps over the lazy dog, 0123456789"


def _ids(page: object, selector: str) -> set[int]:
    cells = page.locator("#grid " + selector)  # type: ignore[attr-defined]
    return {int(x) for x in cells.evaluate_all("cells => cells.map(c => c.dataset.blockId)")}


def test_the_page_draws_the_engines_blocks_and_a_selected_request(tiny_chat_llama: Path) -> None:
    engine = make_engine(str(tiny_chat_llama), num_kv_blocks=64, block_size=4)
    gate, async_engine = gated_inspected_engine(engine, show_text=True)
    auth = {"Authorization": f"Bearer {KEY}"}
    with (
        serve_in_thread(async_engine, api_key=KEY) as base,
        httpx.Client(base_url=base, headers=auth, timeout=120) as http,
    ):
        refused = pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS")
        with browser_page() as anonymous, refused:  # no key: the browser is asked, has none
            anonymous.page.goto(base + "/kv")
        with browser_page(http_credentials={"username": "kv", "password": KEY}) as view:
            page = view.page
            assert page.goto(base + "/kv").status == 200
            page.wait_for_selector("#grid .blk.free")  # the page polls: copies are taken from now
            requests = [
                {"prompt": PROMPT, "n": 2, "max_tokens": 30, "ignore_eos": True, "seed": 1,
                 "temperature": 1.0},
                {"prompt": PROMPT[:30], "max_tokens": 30, "ignore_eos": True},
            ]  # fmt: skip
            threads = [
                threading.Thread(target=http.post, args=("/v1/completions",), kwargs={"json": b})
                for b in requests
            ]
            for thread in threads:
                thread.start()
            wait_for(lambda: async_engine.num_unfinished == 2, "both requests reach the engine")
            gate.allow(3)  # prefill and two decode steps, then the engine is held
            wait_for(lambda: gate.num_steps == 3, "three steps")
            page.wait_for_function(
                "() => document.querySelector('#status').textContent.startsWith('step 3 ')"
            )
            # the engine is held before its fourth step: its structures stand still
            manager = engine.kv_cache_manager
            tables = {rid: manager.get_block_ids(rid) for rid in engine.scheduler.requests}
            refs = [b.ref_cnt for b in manager.pool.blocks]
            shared = {i for i, n in enumerate(refs) if n > 1}
            used = {i for i, n in enumerate(refs) if n == 1}
            assert shared and used, "the script should give both used and shared blocks"
            assert _ids(page, ".blk.shared") == shared
            assert _ids(page, ".blk.used") == used
            for rid, table in tables.items():
                page.locator(f'tr[data-request-id="{rid}"]').click()
                assert _ids(page, ".blk.sel") == {b for b in table if b}, rid
            page.locator(f'tr[data-request-id="{rid}"]').click()  # unselect
            assert _ids(page, ".blk.sel") == set()
            block = min(shared)
            page.locator(f'.blk[data-block-id="{block}"]').click()
            text = page.locator("#block-text").inner_text()
            assert text and text in PROMPT
            assert page.locator("#block").inner_text().count("#") >= 2  # both samples own it
            # paused, the page keeps its picture (and stops polling); resumed, it catches up
            page.locator("#pause").click()
            gate.allow(1)
            wait_for(lambda: http.get("/kv/state").json()["step"] == 4, "the copy of step 4")
            page.wait_for_timeout(1500)  # several poll intervals (400 ms)
            assert page.locator("#status").inner_text().startswith("step 3 ")
            page.locator("#pause").click()
            page.wait_for_function(
                "() => document.querySelector('#status').textContent.startsWith('step 4 ')"
            )
            gate.open()
            for thread in threads:
                thread.join(timeout=120)
            page.wait_for_function(
                "() => document.querySelectorAll('#grid .blk.used, #grid .blk.shared').length == 0"
            )
            assert view.errors == [], view.errors
            assert view.hosts == {"127.0.0.1"}, view.hosts
