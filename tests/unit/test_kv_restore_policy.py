"""Restore or recompute (`restore_policy.num_blocks_to_load`) for a fixed cost table.

Every number is a power of two, so the predicted totals are exact and a tie is a tie. Block
size 16, blocks of 2**20 bytes; recomputing a block costs 16 * 2**-6 = 0.25 s.
    cpu:  latency 2**-6 s + 2**20 / 2**30 s = 2**-6 + 2**-10 s a block (much cheaper)
    disk: latency 2**-3 s + 2**20 / 2**22 s = 0.375 s a block (dearer than 0.25 s)
"""

from __future__ import annotations

import pytest

from kvserve.kv.tiers.restore_policy import CostTable, RunSegment, TierCost, num_blocks_to_load

CPU = TierCost(latency_s=2**-6, bandwidth=2**30)
DISK = TierCost(latency_s=2**-3, bandwidth=2**22)


def table(prefill_s_per_token: float | None = 2**-6, **tiers: TierCost) -> CostTable:
    return CostTable(
        tiers=tiers or {"cpu": CPU, "disk": DISK},
        block_bytes=2**20,
        block_size=16,
        prefill_s_per_token=prefill_s_per_token,
    )


def run(*segments: tuple[str, int]) -> list[RunSegment]:
    return [RunSegment(tier, num_blocks) for tier, num_blocks in segments]


def test_a_tier_costs_latency_plus_bytes_over_bandwidth_per_block() -> None:
    assert CPU.load_s(3, 2**20) == 3 * (2**-6 + 2**-10)
    assert DISK.load_s(1, 2**20) == 0.375
    assert TierCost(0.0, float("inf")).load_s(5, 2**20) == 0.0


@pytest.mark.parametrize(
    ("mode", "want"), [("never", 0), ("always", 6), ("auto", 3)]
)  # auto: the cheap cpu blocks only
def test_never_loads_none_always_loads_the_run_auto_the_cheaper(mode: str, want: int) -> None:
    assert num_blocks_to_load(run(("cpu", 3), ("disk", 3)), table(), mode) == want


def test_auto_loads_a_cheap_run_whole_and_recomputes_a_dear_one() -> None:
    assert num_blocks_to_load(run(("cpu", 4)), table(), "auto") == 4
    assert num_blocks_to_load(run(("disk", 4)), table(), "auto") == 0
    assert num_blocks_to_load([], table(), "auto") == 0


def test_auto_loads_through_a_dear_block_when_cheap_ones_after_it_pay_for_it() -> None:
    # disk costs 0.125 s more than recomputing a block; each cpu block saves 0.25 - (2**-6 +
    # 2**-10) = 0.2333984375 s: one cpu block after the disk block pays for it.
    assert num_blocks_to_load(run(("disk", 1), ("cpu", 1)), table(), "auto") == 2
    # two disk blocks (0.25 s dearer) are not paid for by one cpu block (0.2334 s cheaper)
    assert num_blocks_to_load(run(("disk", 2), ("cpu", 1)), table(), "auto") == 0
    # cpu, disk, cpu: the best prefix is the whole run (-0.2334 + 0.125 - 0.2334 < -0.2334)
    assert num_blocks_to_load(run(("cpu", 1), ("disk", 1), ("cpu", 1)), table(), "auto") == 3
    # ... but with three disk blocks in the middle only the first cpu block is worth loading
    assert num_blocks_to_load(run(("cpu", 1), ("disk", 3), ("cpu", 1)), table(), "auto") == 1


@pytest.mark.parametrize(
    ("prefill_s_per_token", "want"),
    [
        (2**-5, 2),  # recomputing a block costs 0.5 s > 0.375 s: load
        (0.375 / 16, 0),  # exactly equal: a load must be strictly cheaper, so recompute
        (2**-6, 0),  # 0.25 s < 0.375 s: recompute
    ],
)
def test_the_crossover_is_where_loading_a_block_costs_what_computing_it_does(
    prefill_s_per_token: float, want: int
) -> None:
    assert num_blocks_to_load(run(("disk", 2)), table(prefill_s_per_token), "auto") == want


def test_auto_loads_the_whole_run_until_prefill_is_measured() -> None:
    assert num_blocks_to_load(run(("disk", 3)), table(None), "auto") == 3


def test_a_tier_not_measured_yet_loads_free() -> None:
    only_cpu = table(cpu=CPU)
    assert num_blocks_to_load(run(("cpu", 1), ("redis", 2)), only_cpu, "auto") == 3


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="^kv_restore:"):
        num_blocks_to_load(run(("cpu", 1)), table(), "sometimes")
