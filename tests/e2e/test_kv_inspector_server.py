"""The KV inspector's routes on a real server (in a thread of the test): behind the API key
(Bearer, or Basic for a browser), token text only with show_text, errors in OpenAI's shape,
and answers while the engine is held mid-step."""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvserve.server.async_engine import AsyncEngine
from tests.helpers import make_engine
from tests.server_helpers import (
    assert_openai_error,
    gated_inspected_engine,
    serve_in_thread,
    wait_for,
)

KEY = "s3cret"
PROMPT = "the quick brown fox jumps over the lazy dog"
INSPECTOR_PATHS = ["/kv", "/kv/static/kv.js", "/kv/static/kv.css", "/kv/state", "/kv/blocks/1"]


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_no_key_no_page_and_no_state(tiny_chat_llama: Path) -> None:
    engine = AsyncEngine(make_engine(str(tiny_chat_llama), num_kv_blocks=64))
    with serve_in_thread(engine, api_key=KEY) as base:
        for path in INSPECTOR_PATHS:
            reply = httpx.get(base + path, timeout=30)
            assert_openai_error(reply, 401)
            assert reply.headers["www-authenticate"].startswith("Basic")  # a browser asks
            for wrong in (_basic("kv", "nope"), {"Authorization": "Basic !!"}, {}):
                assert httpx.get(base + path, headers=wrong, timeout=30).status_code == 401
            for right in (_basic("anyone", KEY), {"Authorization": f"Bearer {KEY}"}):
                assert httpx.get(base + path, headers=right, timeout=30).status_code == 200
        # Basic is for the inspector's pages only; the API still wants the Bearer key
        reply = httpx.get(base + "/v1/models", headers=_basic("kv", KEY), timeout=30)
        assert_openai_error(reply, 401)
        assert reply.headers["www-authenticate"] == "Bearer"
        assert httpx.get(base + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize("show_text", [False, True])
def test_block_text_only_with_show_text(tiny_chat_llama: Path, show_text: bool) -> None:
    engine = make_engine(str(tiny_chat_llama), num_kv_blocks=64, block_size=4)
    gate, async_engine = gated_inspected_engine(engine, show_text=show_text)
    with serve_in_thread(async_engine) as base, httpx.Client(base_url=base, timeout=60) as http:
        assert http.get("/kv/state").json()["requests"] == []  # watched from now on
        body = {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True}
        thread = threading.Thread(
            target=http.post, args=("/v1/completions",), kwargs={"json": body}
        )
        thread.start()
        gate.allow(2)  # the prefill and one decode step; the engine is held in the third
        wait_for(lambda: http.get("/kv/state").json()["step"] == 2, "the copy of step 2")
        state = http.get("/kv/state")
        (request,) = state.json()["requests"]
        assert request["status"] == "running" and request["num_output_tokens"] == 2
        first = http.get(f"/kv/blocks/{request['block_ids'][0]}").json()
        assert first["owners"] == [{"request_id": request["id"], "index": 0}]
        assert first["state"] == "used" and first["ref_count"] == 1
        if show_text:
            assert PROMPT.startswith(first["text"]) and len(first["token_ids"]) == 4
        else:
            assert first["text"] is None and first["token_ids"] is None
            assert "quick" not in state.text and "token_ids" not in state.text
        assert_openai_error(http.get("/kv/blocks/64"), 404)
        assert_openai_error(http.get("/kv/blocks/x"), 400)
        gate.open()
        thread.join(timeout=60)
        wait_for(lambda: http.get("/kv/state").json()["requests"] == [], "the request ends")
        assert http.get("/kv/state").json()["pool"]["num_used"] == 0


def test_the_tiers_show_what_they_hold(tiny_chat_llama: Path) -> None:
    budget = 1 << 20
    engine = AsyncEngine(make_engine(str(tiny_chat_llama), num_kv_blocks=64, kv_cpu_bytes=budget))
    with serve_in_thread(engine) as base, httpx.Client(base_url=base, timeout=60) as http:
        body = {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}
        http.post("/v1/completions", json=body).raise_for_status()

        def cpu() -> dict[str, Any]:
            return dict(http.get("/kv/state").json()["tiers"].get("cpu", {}))

        wait_for(lambda: cpu().get("blocks_held", 0) > 0, "the CPU tier holds the prompt")
        tier = cpu()
        assert tier["capacity_bytes"] == budget and 0 < tier["bytes_held"] <= budget
        assert tier["blocks_written"] >= tier["blocks_held"]


def test_the_series_comes_in_pieces(tiny_chat_llama: Path) -> None:
    engine = AsyncEngine(make_engine(str(tiny_chat_llama), num_kv_blocks=64))
    with serve_in_thread(engine) as base, httpx.Client(base_url=base, timeout=60) as http:
        wait_for(lambda: len(http.get("/kv/state").json()["series"]) >= 2, "two points")
        whole = http.get("/kv/state").json()
        since = whole["series"][0]["t"]
        part = http.get("/kv/state", params={"since": since}).json()
        assert part["series_origin"] == whole["series_origin"]
        assert part["series"][: len(whole["series"]) - 1] == whole["series"][1:]
        assert all(point["t"] > since for point in part["series"])
        for wrong in ("nan", "inf", "soon"):
            assert_openai_error(http.get("/kv/state", params={"since": wrong}), 400)
