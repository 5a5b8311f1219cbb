"""Restored from a KV tier == recomputed: the CPU and disk tiers under a small pool.

The pool holds few blocks, so a prefix computed early is evicted by the prompts after it. An
engine with a tier loads it back instead of recomputing it; its greedy tokens and logprobs
must equal those of an engine with no tier, and `num_cached_tokens` counts the loaded tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.kv.tiers.disk import DiskStore
from kvserve.kv.tiers.tiered import TieredConnector
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from tests.helpers import random_prompts, run_engine, token_ids
from tests.invariance.test_kv_connector import assert_same_logprobs

BLOCK = 16
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


def make(llama: str, **tiers: object) -> Engine:
    """An engine with a small pool; with a tier, it restores whatever it finds there
    (kv_restore "always": "auto" weighs this machine's speed, see test_kv_restore_engine)."""
    config = EngineConfig(
        model=llama, num_kv_blocks=24, max_model_len=128, block_size=BLOCK, kv_restore="always"
    )
    return Engine(config.replace(**tiers))


def evicting_workload(engine: Engine) -> tuple[list[int], list[list[int]]]:
    """A 64-token prefix, then prompts that together need more blocks than the pool has."""
    vocab_size = engine.model_config.vocab_size
    (prefix,) = random_prompts(vocab_size, [64], seed=1)
    fillers = random_prompts(vocab_size, [90, 90, 90, 90], seed=2)
    return prefix, fillers


def run_one_by_one(engine: Engine, prompts: list[list[int]]) -> list[RequestOutput]:
    """Each prompt once the one before finished and its blocks reached every tier (the slow
    tiers are written in the background: without the wait, a lookup may find them or not)."""
    outputs = []
    for prompt in prompts:
        outputs.append(run_engine(engine, [prompt], PARAMS)[0])
        assert engine.flush_kv_saves(timeout=60)
    return outputs


@pytest.mark.parametrize("tier", ["cpu", "disk", "both"])
def test_a_prefix_evicted_from_the_pool_is_restored_from_the_tier(
    llama: str, tier: str, tmp_path: Path
) -> None:
    args: dict[str, object] = {}
    if tier in ("cpu", "both"):
        args["kv_cpu_bytes"] = 64 * 2**20
    if tier in ("disk", "both"):
        args["kv_disk_dir"] = str(tmp_path / "kv")
    plain, tiered = make(llama), make(llama, **args)
    prefix, fillers = evicting_workload(plain)
    prompts = [prefix + [5, 6, 7], *fillers, prefix + [8, 9]]
    want = run_one_by_one(plain, prompts)
    got = run_one_by_one(tiered, prompts)
    assert token_ids(got) == token_ids(want)
    assert_same_logprobs(got, want)
    assert want[-1].num_cached_tokens == 0  # the pool alone lost the prefix
    assert got[-1].num_cached_tokens == 64  # all four prefix blocks came back from the tier
    assert isinstance(tiered.kv_connector, TieredConnector)
    tiered.scheduler.check_invariants()
    tiered.kv_connector.check_invariants()
    assert tiered.kv_cache_manager.num_used_blocks == 0
    tiered.close()


def test_the_disk_tier_serves_a_prefix_across_a_restart(llama: str, tmp_path: Path) -> None:
    directory = str(tmp_path / "kv")
    first = make(llama, kv_disk_dir=directory)
    (prompt,) = random_prompts(first.model_config.vocab_size, [50], seed=7)
    want = run_engine(first, [prompt], PARAMS)
    first.close()  # writes what the background writer holds
    second = make(llama, kv_disk_dir=directory)  # a new process would find the same files
    got = run_engine(second, [prompt], PARAMS)
    second.close()
    assert token_ids(got) == token_ids(want)
    assert_same_logprobs(got, want)
    assert got[0].num_cached_tokens == 48  # the three full blocks of 50 tokens


def tamper_files(files: list[Path], how: str) -> None:
    """Flip a byte in, or cut the tail off, every entry; or swap the first two entries."""
    if how == "swap":  # two valid entries, each under the other's name
        first, second = files[0].read_bytes(), files[1].read_bytes()
        files[0].write_bytes(second)
        files[1].write_bytes(first)
        return
    for path in files:
        data = path.read_bytes()
        if how == "corrupt":
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        else:
            data = data[: len(data) - 10]
        path.write_bytes(data)


@pytest.mark.parametrize("how", ["corrupt", "truncate", "swap"])
def test_tampered_entries_on_disk_are_misses_never_wrong_tokens(
    llama: str, tmp_path: Path, how: str
) -> None:
    directory = tmp_path / "kv"
    first = make(llama, kv_disk_dir=str(directory))
    (prompt,) = random_prompts(first.model_config.vocab_size, [50], seed=8)
    want = run_engine(first, [prompt], PARAMS)
    first.close()
    disk = DiskStore(directory, 2**30)
    files = [disk.path_of(h) for h in first.block_hash_params.block_hashes(prompt)]
    assert sorted(files) == sorted(p for p in directory.rglob("*") if p.is_file())
    tamper_files(files, how)
    second = make(llama, kv_disk_dir=str(directory))
    got = run_engine(second, [prompt], PARAMS)
    assert token_ids(got) == token_ids(want)
    assert got[0].num_cached_tokens == 0
    assert isinstance(second.kv_connector, TieredConnector)
    assert second.kv_connector.num_unreadable == 1  # the first block ends the chain
    assert second.kv_cache_manager.num_used_blocks == 0
    second.close()


def test_a_full_disk_costs_hits_not_tokens(
    llama: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every disk write fails (ENOSPC at the rename): the CPU tier still serves, reads go on."""

    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    plain = make(llama)
    prefix, fillers = evicting_workload(plain)
    prompts = [prefix + [5, 6, 7], *fillers, prefix + [8, 9]]
    want = run_one_by_one(plain, prompts)
    monkeypatch.setattr(os, "replace", disk_full)
    tiered = make(llama, kv_cpu_bytes=64 * 2**20, kv_disk_dir=str(tmp_path / "kv"))
    got = run_one_by_one(tiered, prompts)
    assert token_ids(got) == token_ids(want)
    assert_same_logprobs(got, want)
    assert got[-1].num_cached_tokens_by_tier == {"cpu": 64}
    disk = tiered.get_metrics().kv_tiers["disk"]
    assert disk.errors > 0 and disk.blocks_written == 0 and disk.hits == 0
    assert not list((tmp_path / "kv").rglob("*.kv"))
    tiered.scheduler.check_invariants()
    tiered.close()


def test_a_disk_budget_smaller_than_the_prefix_keeps_its_newest_blocks(
    llama: str, tmp_path: Path
) -> None:
    """Two blocks' worth of disk under a four-block prefix: LRU keeps the last two, which are
    useless without the first (the chain stops at h0): a miss, the right tokens."""
    plain = make(llama)
    prefix, fillers = evicting_workload(plain)
    prompts = [prefix + [5, 6, 7], *fillers, prefix + [8, 9]]
    want = run_one_by_one(plain, prompts)
    probe = make(llama, kv_disk_dir=str(tmp_path / "probe"))
    run_one_by_one(probe, prompts[:1])
    block_bytes = max(p.stat().st_size for p in (tmp_path / "probe").rglob("*.kv"))
    probe.close()
    tiered = make(llama, kv_disk_dir=str(tmp_path / "kv"), kv_disk_bytes=2 * block_bytes)
    got = run_one_by_one(tiered, prompts)
    assert token_ids(got) == token_ids(want)
    assert_same_logprobs(got, want)
    assert got[-1].num_cached_tokens == 0
    disk = tiered.get_metrics().kv_tiers["disk"]
    assert disk.evictions > 0 and disk.errors == 0
    assert len(list((tmp_path / "kv").rglob("*.kv"))) == 2
    tiered.kv_connector.check_invariants()  # type: ignore[union-attr]
    tiered.close()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kv_cpu_bytes": -1}, "kv_cpu_bytes"),
        ({"kv_disk_bytes": 0}, "kv_disk_bytes"),
        ({"kv_cpu_bytes": 2**20, "cache_mode": "contiguous"}, "kv_cpu_bytes"),
        ({"kv_disk_dir": "x", "enable_prefix_caching": False}, "kv_disk_dir"),
    ],
)
def test_tier_arguments_are_checked(llama: str, changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        make(llama, **changes)
