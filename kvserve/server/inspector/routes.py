"""The inspector's routes, all behind the API key like the API (a browser is asked for it
with HTTP Basic: any user name, the key as password):

    GET /kv                 the page (static/kv.html; its script and style under /kv/static/)
    GET /kv/state           the cache now, the series and the cost, as JSON (docs/inspector.md);
                            ?since=t: only the series' points after t (what the page polls)
    GET /kv/blocks/{id}     one block: state, ref count, hash, owners (text with
                            --kv-inspector-show-text)

An engine without an inspector (`kvserve cluster`'s replicas) answers 404 on the JSON routes.
"""

from __future__ import annotations

import asyncio
import math
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from kvserve.server.inspector.publisher import KVInspector
from kvserve.server.inspector.state_json import block_json, state_json

STATIC = resources.files("kvserve.server.inspector") / "static"
NO_CACHE = {"Cache-Control": "no-store"}


def add_inspector_routes(app: FastAPI, engine: Any) -> None:
    """/kv, /kv/static/*, /kv/state and /kv/blocks/{id} on `app` for `engine` (an engine
    client; its `inspector` attribute, when it has one, is read)."""

    def inspector() -> KVInspector:
        found = getattr(engine, "inspector", None)
        if not isinstance(found, KVInspector):
            raise HTTPException(404, "the KV inspector needs one engine (kvserve serve)")
        return found

    @app.get("/kv")
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "kv.html"), headers=NO_CACHE)

    app.mount("/kv/static", StaticFiles(directory=str(STATIC)), name="kv-static")

    @app.get("/kv/state")
    async def state(since: float | None = None) -> JSONResponse:
        if since is not None and not math.isfinite(since):
            raise HTTPException(400, "since: must be a finite number of seconds")
        source = inspector()
        current = await _latest(source)
        return JSONResponse(state_json(source, current, since), headers=NO_CACHE)

    @app.get("/kv/blocks/{block_id}")
    async def block(block_id: int) -> JSONResponse:
        source = inspector()
        current = await _latest(source)
        if not 0 <= block_id < len(current.ref_counts):
            message = f"block {block_id} does not exist (0..{len(current.ref_counts) - 1})"
            raise HTTPException(404, message)
        body = block_json(source, current, block_id, getattr(engine, "tokenizer", None))
        return JSONResponse(body, headers=NO_CACHE)


async def _latest(source: KVInspector) -> Any:
    """The latest copy; the first view waits up to a second for the engine to take one."""
    for _ in range(20):
        current = source.view()
        if current is not None:
            return current
        await asyncio.sleep(0.05)
    raise HTTPException(503, "the KV inspector has no copy of the cache yet (engine busy)")
