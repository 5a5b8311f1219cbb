"""`/metrics` of a server whose engine has KV tiers: one family per tier counter, a sample per
tier (`tier` label), the load latency histogram; the server's shutdown closes the engine."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from kvserve.server.async_engine import AsyncEngine
from tests.invariance.test_kv_tiers_engine import evicting_workload, make
from tests.server_helpers import metric, serve_in_thread, wait_until_idle


def test_metrics_report_each_tier_with_its_label(tiny_llama: Path, tmp_path: Path) -> None:
    before = set(threading.enumerate())
    engine = make(str(tiny_llama), kv_cpu_bytes=64 * 2**20, kv_disk_dir=str(tmp_path))
    prefix, fillers = evicting_workload(engine)
    body = {"max_tokens": 2, "temperature": 0}
    with serve_in_thread(AsyncEngine(engine)) as base:
        for prompt in (prefix + [5], *fillers, prefix + [8]):
            reply = httpx.post(
                f"{base}/v1/completions", json={**body, "prompt": prompt}, timeout=60
            )
            assert reply.status_code == 200, reply.text
            wait_until_idle(base)
        cpu_hits = metric(base, 'kv_tier_hits_total{model_name="tiny",tier="cpu"}')
        lines = httpx.get(f"{base}/metrics", timeout=30).text.splitlines()
    assert cpu_hits >= 4  # the prefix came back from the cpu tier (written in the step)
    for name in ("hits", "misses", "bytes_read", "blocks_written", "bytes_written", "evictions",
                 "errors", "rejected", "dropped_writes"):  # fmt: skip
        for tier in ("cpu", "disk"):
            start = f'kvserve:kv_tier_{name}_total{{model_name="tiny",tier="{tier}"}} '
            assert any(line.startswith(start) for line in lines), start
    for tier in ("cpu", "disk"):
        start = f'kvserve:kv_tier_load_seconds_bucket{{le="+Inf",model_name="tiny",tier="{tier}"}}'
        assert any(line.startswith(start) for line in lines), start
    assert any(
        line.startswith('kvserve:kv_tier_unreadable_total{model_name="tiny"}') for line in lines
    )
    # The server's shutdown closed the engine: its background writer's thread is gone.
    new_threads = set(threading.enumerate()) - before
    assert [t.name for t in new_threads if t.name == "kvserve-kv-writer"] == []
