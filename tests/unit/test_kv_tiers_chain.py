"""The tier chain (`TieredConnector`): lookup continues the hash chain down the tiers, loads
write back exactly what was saved, and an unreadable entry ends the run as a miss."""

from __future__ import annotations

import pytest
import torch

from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_cache import KVCaches, allocate_kv_caches, read_block
from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.kv.tiers.cpu import CPUStore
from kvserve.kv.tiers.tiered import TieredConnector

PARAMS = BlockHashParams(4, "model-a", "auto")
HASHES = [bytes([i]) * 32 for i in range(1, 8)]


def caches(dtype: torch.dtype = torch.float32, seed: int = 0) -> KVCaches:
    kv = allocate_kv_caches(2, 8, 4, 2, 8, dtype, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for layer in kv:
            for tensor in layer:
                if tensor is not None and tensor.is_floating_point():
                    tensor[1:].copy_(torch.randn(tensor[1:].shape, generator=generator))
    return kv


def chain(*stores: CPUStore) -> tuple[TieredConnector, KVCaches]:
    kv = caches()
    connector = TieredConnector(list(stores), PARAMS)
    connector.register_kv_caches(kv)
    return connector, kv


def test_lookup_continues_the_chain_down_the_tiers() -> None:
    cpu, disk = CPUStore(2**20), CPUStore(2**20)
    connector, kv = chain(cpu, disk)
    # Blocks 1..6 hold h1..h6; cpu keeps h1 h2 (and h5), the lower tier h3 h4 (and h6).
    for store, ids in ((cpu, (1, 2, 5)), (disk, (3, 4, 6))):
        TieredConnector([store], PARAMS).save_blocks(
            kv, [BlockTransfer(i, HASHES[i - 1]) for i in ids]
        )
    assert connector.num_external_hit_blocks(HASHES[:6]) == 6  # cpu, disk, cpu, disk
    assert connector.num_external_hit_blocks([HASHES[0], HASHES[6]]) == 1  # h7 is nowhere
    assert connector.num_external_hit_blocks(HASHES[2:4]) == 2  # a chain may start in disk


def test_loads_write_back_exactly_what_was_saved() -> None:
    store = CPUStore(2**20)
    saver, kv = chain(store)
    saver.save_blocks(kv, [BlockTransfer(1, HASHES[0]), BlockTransfer(2, HASHES[1])])
    loader, other = chain(store)
    other_before = read_block(other, 5)
    assert loader.num_external_hit_blocks(HASHES[:3]) == 2
    loads = [BlockTransfer(5, HASHES[0]), BlockTransfer(6, HASHES[1])]
    loader.prepare_loads(loads)
    with torch.inference_mode():  # as in the model runner: the caches are inference tensors
        loader.load_blocks(other, loads)
    for src, dst in ((1, 5), (2, 6)):
        for saved, loaded in zip(read_block(kv, src), read_block(other, dst), strict=True):
            for a, b in zip(saved, loaded, strict=True):
                assert (a is None and b is None) or torch.equal(a, b)
    assert any(
        not torch.equal(a, b)
        for saved, now in zip(other_before, read_block(other, 5), strict=True)
        for a, b in zip(saved, now, strict=True)
        if a is not None and b is not None
    )


def test_a_run_not_loaded_stays_staged_and_is_read_once() -> None:
    store = CPUStore(2**20)
    connector, kv = chain(store)
    connector.save_blocks(kv, [BlockTransfer(1, HASHES[0]), BlockTransfer(2, HASHES[1])])
    for _ in range(3):  # a waiting request looked up each step, not admitted (pool full)
        assert connector.num_external_hit_blocks(HASHES[:2]) == 2
        connector.prepare_loads([])
    assert store.stats.hits == 2  # each block read and decoded once
    loads = [BlockTransfer(5, HASHES[0]), BlockTransfer(6, HASHES[1])]
    connector.prepare_loads(loads)
    with torch.inference_mode():
        connector.load_blocks(kv, loads)
    assert torch.equal(read_block(kv, 5)[0][0], read_block(kv, 1)[0][0])
    with pytest.raises(KeyError):  # taken by the load: a second load was never counted
        connector.prepare_loads(loads[:1])


def test_staged_blocks_past_the_bound_are_let_go_oldest_first() -> None:
    store = CPUStore(2**20)
    connector, kv = chain(store)
    connector.save_blocks(kv, [BlockTransfer(i, HASHES[i - 1]) for i in (1, 2, 3)])
    for block_hash in HASHES[:3]:  # three requests of one block each, oldest first
        assert connector.num_external_hit_blocks([block_hash]) == 1
    one_block = connector._staged.num_bytes // 3
    connector._staged.max_bytes = 2 * one_block
    connector.num_external_hit_blocks([HASHES[0]])  # h1 wanted again: the newest now
    connector.prepare_loads([])
    assert HASHES[1] not in connector._staged  # the oldest one nobody asked for again
    assert HASHES[0] in connector._staged and HASHES[2] in connector._staged
    assert connector._staged.num_bytes == 2 * one_block


def test_an_unreadable_or_foreign_entry_ends_the_run() -> None:
    store = CPUStore(2**20)
    connector, kv = chain(store)
    connector.save_blocks(kv, [BlockTransfer(i, HASHES[i - 1]) for i in (1, 2, 3)])
    payload = store.get(HASHES[1])
    assert payload is not None
    store.put(HASHES[1], payload[:-1])  # truncated
    assert connector.num_external_hit_blocks(HASHES[:3]) == 1
    assert connector.num_unreadable == 1
    assert store.num_leading([HASHES[1]]) == 0  # dropped, so a later save replaces it
    foreign = TieredConnector([store], BlockHashParams(4, "model-b", "auto"))
    foreign.register_kv_caches(kv)
    assert foreign.num_external_hit_blocks(HASHES[:1]) == 0
