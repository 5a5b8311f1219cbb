"""Per-tier metrics through the engine: `get_metrics().kv_tiers` after a prefix is restored
from a tier (the server's `/metrics`: tests/e2e/test_server_kv_tiers.py)."""

from __future__ import annotations

import threading
from pathlib import Path

from kvserve.kv.tiers.cpu import CPUStore
from kvserve.kv.tiers.tiered import TieredConnector
from kvserve.llm import LLM
from kvserve.sampling_params import SamplingParams
from tests.invariance.test_kv_tiers_engine import evicting_workload, make, run_one_by_one


def test_a_restore_shows_in_the_tier_counters(tiny_checkpoints: dict[str, str]) -> None:
    engine = make(tiny_checkpoints["llama"], kv_cpu_bytes=64 * 2**20)
    prefix, fillers = evicting_workload(engine)
    outputs = run_one_by_one(engine, [prefix + [5, 6, 7], *fillers, prefix + [8, 9]])
    assert outputs[-1].num_cached_tokens == 64  # four blocks came back from the cpu tier
    assert isinstance(engine.kv_connector, TieredConnector)
    (cpu,) = engine.kv_connector.stores
    assert isinstance(cpu, CPUStore)
    payload = cpu.num_bytes // len(cpu)  # every block encodes to the same size
    assert cpu.num_bytes == payload * len(cpu)
    metrics = engine.get_metrics()
    assert list(metrics.kv_tiers) == ["cpu"]
    tier = metrics.kv_tiers["cpu"]
    assert tier.hits >= 4
    assert tier.bytes_read == payload * tier.hits
    assert (tier.blocks_written, tier.bytes_written) == (len(cpu), cpu.num_bytes)  # no eviction
    assert tier.load_seconds_count == tier.hits
    assert (tier.errors, tier.dropped_writes, metrics.kv_tier_unreadable) == (0, 0, 0)
    engine.close()


def test_an_engine_without_tiers_reports_none(tiny_checkpoints: dict[str, str]) -> None:
    engine = make(tiny_checkpoints["llama"])
    metrics = engine.get_metrics()
    assert (metrics.kv_tiers, metrics.kv_tier_unreadable) == ({}, 0)
    assert engine.flush_kv_saves(timeout=0)  # nothing to wait for
    engine.close()


def test_closing_an_llm_writes_its_disk_saves_and_stops_the_writer(
    tiny_checkpoints: dict[str, str], tmp_path: Path
) -> None:
    before = set(threading.enumerate())
    llm = LLM(tiny_checkpoints["llama"], kv_disk_dir=str(tmp_path), max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([{"prompt_token_ids": list(range(1, 51))}], params, use_tqdm=False)
    llm.close()
    assert len(list(tmp_path.rglob("*.kv"))) == 3  # the three full blocks of 50 tokens
    new_threads = set(threading.enumerate()) - before
    assert [t.name for t in new_threads if t.name == "kvserve-kv-writer"] == []
    disk = llm.get_metrics().kv_tiers["disk"]
    assert (disk.blocks_written, disk.dropped_writes) == (3, 0)
