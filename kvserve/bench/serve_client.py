"""The client of `kvserve bench serve`: streamed `/v1/completions` calls, each sent at its
arrival time (open loop), timed chunk by chunk.

    request:   sent -------- ttft --------> chunk 1 -- itl --> chunk 2 ... chunk n = done
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import httpx

from kvserve.bench import serve_report
from kvserve.bench import serve_workload as sw


async def send_request(
    client: httpx.AsyncClient, base_url: str, model: str, request: sw.BenchRequest, start: float
) -> serve_report.RequestResult:
    """Stream one completion; failures become a result with `ok=False`, never an exception."""
    body = {
        "model": model,
        "prompt": request.prompt_token_ids,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter() - start
    chunk_times: list[float] = []
    usage: dict[str, Any] = {}
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return _failed(request, sent, f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if chunk.get("choices"):
                    chunk_times.append(time.perf_counter() - start)
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return _failed(request, sent, f"{type(error).__name__}: {error}")
    if not chunk_times or not usage:
        return _failed(request, sent, "stream ended without tokens or usage")
    details = usage.get("prompt_tokens_details") or {}
    return serve_report.RequestResult(
        request.tag, sent, True, "", int(usage["prompt_tokens"]),
        int(usage["completion_tokens"]), int(details.get("cached_tokens") or 0), chunk_times,
    )  # fmt: skip


def _failed(request: sw.BenchRequest, sent: float, error: str) -> serve_report.RequestResult:
    return serve_report.RequestResult(
        request.tag, sent, False, error, len(request.prompt_token_ids), 0, 0, []
    )


async def run_workload(
    base_url: str,
    model: str,
    requests: Sequence[sw.BenchRequest],
    max_concurrency: int | None = None,
    progress: bool = False,
) -> tuple[list[serve_report.RequestResult], float]:
    """Send every request at its arrival time; (results in request order, duration s)."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    timeout = httpx.Timeout(None, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    bar = _progress_bar(len(requests)) if progress else None
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()

        async def one(request: sw.BenchRequest) -> serve_report.RequestResult:
            delay = request.arrival_s - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is None:
                result = await send_request(client, base_url, model, request, start)
            else:
                async with limit:
                    result = await send_request(client, base_url, model, request, start)
            if bar is not None:
                bar.update(1)
            return result

        results = await asyncio.gather(*(one(r) for r in requests))
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(results), duration


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")
