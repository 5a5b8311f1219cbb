"""The measured cost table (cost.py) and the connector's restore decisions (tiered.py).

Observations are fed by hand with power-of-two numbers, so averages are exact; the probe and
the connector run on real CPU stores, and only what does not depend on the machine's speed is
asserted (keys removed, counters untouched, what was read, what was decided).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_cache import KVCaches, allocate_kv_caches
from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.kv.tiers.base import TierStats
from kvserve.kv.tiers.cost import RestoreCostModel, probe_store
from kvserve.kv.tiers.cpu import CPUStore
from kvserve.kv.tiers.disk import DiskStore
from kvserve.kv.tiers.restore_policy import CostTable, TierCost
from kvserve.kv.tiers.tiered import RestoreStats, TieredConnector

PARAMS = BlockHashParams(4, "model-a", "auto")
HASHES = [bytes([i]) * 32 for i in range(1, 8)]
CHEAP = TierCost(0.0, float("inf"))
DEAR = TierCost(2.0**10, 1.0)


def test_the_prefill_rate_is_seconds_over_tokens_of_forwards_with_a_prefill() -> None:
    model = RestoreCostModel(block_size=4, ewma_weight=0.5)
    assert model.table().prefill_s_per_token is None  # nothing measured: auto loads
    model.observe_forward(num_tokens=8, num_decodes=8, seconds=1.0)  # all-decode: left out
    assert model.table().prefill_s_per_token is None
    model.observe_forward(num_tokens=64, num_decodes=0, seconds=1.0)  # the first is taken as is
    assert model.table().prefill_s_per_token == 2**-6
    model.observe_forward(num_tokens=192, num_decodes=2, seconds=1.0)  # the first decays
    assert model.table().prefill_s_per_token == (0.25 * 1 + 0.5 * 1) / (0.25 * 64 + 0.5 * 192)


def test_a_tier_is_probed_then_its_bandwidth_follows_the_reads() -> None:
    model = RestoreCostModel(block_size=4, ewma_weight=0.5)
    model.block_bytes = 1024
    model.set_tier("disk", latency_s=2**-10, block_s=2**-10 + 2**-8)
    assert model.table().tiers == {"disk": TierCost(2**-10, 1024 / 2**-8)}
    model.observe_load("disk", 1024, 2**-10 + 2**-6)  # 4x slower beyond the latency
    transfer_s = 0.5 * 2**-8 + 0.5 * 2**-6
    assert model.table().tiers["disk"] == TierCost(2**-10, 1024 / transfer_s)
    model.observe_load("cpu", 2048, 2**-9)  # never probed: no latency, the first read as is
    assert model.table().tiers["cpu"] == TierCost(0.0, 2048 / 2**-9)


def test_a_fixed_model_ignores_observations() -> None:
    table = CostTable({"cpu": TierCost(2**-10, 2**20)}, 4096, 4, 2**-6)
    model = RestoreCostModel.fixed(table)
    model.observe_forward(64, 0, 1.0)
    model.observe_load("cpu", 4096, 1.0)
    model.observe_load("disk", 4096, 1.0)
    assert model.table() == table
    with pytest.raises(ValueError, match="^ewma_weight:"):
        RestoreCostModel(4, ewma_weight=1.5)


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_the_probe_leaves_no_key_and_no_count_behind(kind: str, tmp_path: Path) -> None:
    store = CPUStore(2**20) if kind == "cpu" else DiskStore(tmp_path / "kv", 2**20)
    store.put(HASHES[0], b"an engine's block")
    before = TierStats(**vars(store.stats))
    probe = probe_store(store, b"\x07" * 32, b"x" * 4096, decode=lambda value: value)
    assert probe is not None and probe.latency_s >= 0 and probe.block_s >= 0
    assert store.keys() == [HASHES[0]]
    assert store.stats == before
    assert probe_store(store, b"\x07" * 32, b"x" * 4096, decode=lambda value: None) is None
    assert probe_store(CPUStore(16), b"\x07" * 32, b"x" * 4096, lambda v: v) is None  # refused
    store.check_invariants()


def caches() -> KVCaches:
    kv = allocate_kv_caches(2, 8, 4, 2, 8, torch.float32, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for layer in kv:
            for tensor in layer:
                if tensor is not None:
                    tensor[1:].copy_(torch.randn(tensor[1:].shape, generator=generator))
    return kv


def saved_chain(restore: str, tmp_path: Path) -> tuple[TieredConnector, CPUStore, DiskStore]:
    """cpu holds h1 h2, disk h3 h4 (blocks 1..4 of the same caches)."""
    cpu, disk = CPUStore(2**20), DiskStore(tmp_path / "kv", 2**20)
    kv = caches()
    for store, ids in ((cpu, (1, 2)), (disk, (3, 4))):
        saver = TieredConnector([store], PARAMS, restore="always")
        saver.register_kv_caches(kv)
        saver.save_blocks(kv, [BlockTransfer(i, HASHES[i - 1]) for i in ids])
        assert saver.flush(timeout=30)  # the disk writes run in the background: wait for them
    connector = TieredConnector([cpu, disk], PARAMS, restore=restore)
    connector.register_kv_caches(kv)
    return connector, cpu, disk


@pytest.mark.parametrize(
    ("restore", "want", "stats"),
    [
        ("never", 0, RestoreStats(0, 1, 0, 4)),
        ("always", 4, RestoreStats(1, 0, 4, 0)),
    ],
)
def test_never_reads_nothing_and_always_reads_the_run(
    restore: str, want: int, stats: RestoreStats, tmp_path: Path
) -> None:
    connector, cpu, disk = saved_chain(restore, tmp_path)
    assert connector.num_external_hit_blocks(HASHES[:5]) == want
    assert connector.restore_stats == stats
    assert cpu.stats.hits + disk.stats.hits == want  # a block is read only to be loaded
    assert connector.get_hit_tiers(HASHES[:want]) == ({"cpu": 2, "disk": 2} if want else {})


def test_auto_probes_each_tier_and_decides_before_reading(tmp_path: Path) -> None:
    connector, cpu, disk = saved_chain("auto", tmp_path)
    measured = connector.costs.table()
    assert set(measured.tiers) == {"cpu", "disk"}  # probed at register_kv_caches
    assert measured.block_bytes > 0 and measured.prefill_s_per_token is None
    assert len(cpu) == 2 and len(disk) == 2  # the probe's keys are gone
    # cpu blocks load free; a disk block costs 1024 s, recomputing one 4 * 2**-6 s.
    connector.costs = RestoreCostModel.fixed(
        CostTable({"cpu": CHEAP, "disk": DEAR}, measured.block_bytes, 4, 2**-6)
    )
    assert connector.num_external_hit_blocks(HASHES[:5]) == 2
    assert (cpu.stats.hits, disk.stats.hits) == (2, 0)  # no disk block was read
    assert connector.get_hit_tiers(HASHES[:2]) == {"cpu": 2}
    assert connector.restore_stats == RestoreStats(1, 0, 2, 2)
    connector.costs = RestoreCostModel.fixed(
        CostTable({"cpu": DEAR, "disk": DEAR}, measured.block_bytes, 4, 2**-6)
    )
    assert connector.num_external_hit_blocks(HASHES[:5]) == 0
    assert connector.restore_stats == RestoreStats(1, 1, 2, 6)


def test_a_tier_left_out_since_a_slow_read_is_probed_again_once_stale(tmp_path: Path) -> None:
    """One slow disk read (1024 s for a block) makes "auto" stop loading from disk; it would
    never read disk again to learn otherwise. Once the disk's cost is older than
    `stale_after_s`, the next decision that leaves disk blocks out probes disk again."""
    connector, cpu, disk = saved_chain("auto", tmp_path)
    now = [0.0]
    costs = RestoreCostModel(4, ewma_weight=1.0, stale_after_s=10.0, clock=lambda: now[0])
    costs.block_bytes = connector.costs.block_bytes
    costs.set_tier("cpu", 0.0, 0.0)
    costs.observe_forward(4, 0, 2.0**-4)  # prefill: 2**-6 s a token
    costs.observe_load("disk", costs.block_bytes, 2.0**10)  # the slow read
    connector.costs = costs
    assert connector.num_external_hit_blocks(HASHES[:5]) == 2  # cpu only: disk is dear
    assert disk.stats.hits == 0
    now[0] = 11.0  # disk's cost was measured 11 s ago
    assert connector.num_external_hit_blocks(HASHES[:5]) == 4  # probed: disk is cheap again
    assert disk.stats.hits == 6 + 2  # the probe: 3 block and 3 tiny reads; then two blocks
    assert not costs.is_stale("disk")
