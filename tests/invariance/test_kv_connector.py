"""Restored through a KV connector == recomputed; the hash contract a router relies on.

`InMemoryConnector` is the second implementation of the connector seam (besides the no-op):
a dict from block hash to the block's tensors in every layer, read and written with
`kv_cache.read_block` / `write_block`. It saves every full block the engine writes; once the
pool forgets its prefix cache, a request with the same prefix loads those blocks instead of
recomputing them, and must produce the same tokens and logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.kv.kv_cache import BlockData, KVCaches, read_block, write_block
from kvserve.kv.kv_connector import KVConnector
from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from tests.helpers import make_engine, random_prompts, run_engine, token_ids

BLOCK = 16
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)


class InMemoryConnector(KVConnector):
    """Every saved block's tensors, by hash; counts what it loads."""

    def __init__(self) -> None:
        self.store: dict[bytes, BlockData] = {}
        self.loaded: list[bytes] = []

    @property
    def saves_blocks(self) -> bool:
        return True

    def num_external_hit_blocks(self, block_hashes: Sequence[bytes]) -> int:
        count = 0
        while count < len(block_hashes) and block_hashes[count] in self.store:
            count += 1
        return count

    def load_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        for block in blocks:
            write_block(kv_caches, block.block_id, self.store[block.block_hash])
            self.loaded.append(block.block_hash)

    def save_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        for block in blocks:
            self.store.setdefault(block.block_hash, read_block(kv_caches, block.block_id))


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


def assert_same_logprobs(got: list[RequestOutput], want: list[RequestOutput]) -> None:
    for a, b in zip(got, want, strict=True):
        rows_a, rows_b = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert rows_a is not None and rows_b is not None
        for row_a, row_b in zip(rows_a, rows_b, strict=True):
            assert row_a.keys() == row_b.keys()
            for token_id, entry in row_a.items():
                assert entry.logprob == pytest.approx(row_b[token_id].logprob, abs=1e-5)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_prefix_restored_through_the_connector_equals_recomputed(
    llama: str, kv_cache_dtype: str
) -> None:
    connector = InMemoryConnector()
    config = EngineConfig(
        model=llama,
        num_kv_blocks=64,
        max_model_len=128,
        block_size=BLOCK,
        kv_cache_dtype=kv_cache_dtype,
    )
    engine = Engine(config, kv_connector=connector)
    (system,) = random_prompts(engine.model_config.vocab_size, [40], seed=3)
    tails = random_prompts(engine.model_config.vocab_size, [5, 16, 30], seed=4)
    prompts = [system + tail for tail in tails]
    run_engine(engine, [system], PARAMS)  # computes the 40-token prefix: 2 full blocks saved
    system_hashes = engine.block_hash_params.block_hashes(system)
    assert set(system_hashes) <= set(connector.store)
    assert engine.kv_cache_manager.reset_prefix_cache()  # only the connector holds it now
    restored = run_engine(engine, prompts, PARAMS)
    assert [o.num_cached_tokens for o in restored] == [32, 32, 32]
    assert connector.loaded == system_hashes  # loaded once; the burst's others hit the pool
    recompute = make_engine(
        llama, block_size=BLOCK, kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False
    )
    recomputed = run_engine(recompute, prompts, PARAMS)
    assert token_ids(restored) == token_ids(recomputed)
    assert_same_logprobs(restored, recomputed)


def test_router_hashes_equal_the_engine_request_hashes(llama: str) -> None:
    for caching in (True, False):
        engine = make_engine(llama, block_size=BLOCK, enable_prefix_caching=caching)
        (prompt,) = random_prompts(engine.model_config.vocab_size, [37], seed=5)
        engine.add_request("r", {"prompt_token_ids": prompt, "cache_salt": "t"}, PARAMS)
        engine.step()
        request = engine.scheduler.requests["r"]
        params = engine.block_hash_params
        assert (params.block_size, params.kv_cache_dtype) == (BLOCK, "auto")
        assert params.model_fingerprint == engine.model_config.fingerprint
        assert request.block_hashes == params.block_hashes(prompt, cache_salt="t")
        assert request.block_hashes != params.block_hashes(prompt)
        engine.abort_request("r")
