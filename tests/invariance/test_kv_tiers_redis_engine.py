"""The Redis tier under a real engine and a real redis-server: restored == recomputed, a pool
shared by two engine processes, and faults (Redis killed mid-run, tampered entries, a wrong
`kv_remote_secret`) that cost hits but never a wrong token or a leaked block."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.kv.tiers.redis_store import MAX_BACKOFF_S, RedisStore
from kvserve.kv.tiers.tiered import TieredConnector
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from tests.helpers import assert_no_blocks_held, random_prompts, run_engine, token_ids
from tests.invariance.test_kv_connector import assert_same_logprobs
from tests.invariance.test_kv_tiers_engine import evicting_workload, run_one_by_one
from tests.redis_server import FakeClock, RedisServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]  # the second engine's process imports this checkout
BLOCK = 16
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ENGINE_ARGS: dict[str, object] = dict(
    num_kv_blocks=24, max_model_len=128, block_size=BLOCK, kv_restore="always"
)


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


def make(llama: str, connector: TieredConnector | None = None, **tiers: object) -> Engine:
    return Engine(EngineConfig(model=llama, **{**ENGINE_ARGS, **tiers}), connector)  # type: ignore[arg-type]


def tiers_of(engine: Engine) -> TieredConnector:
    assert isinstance(engine.kv_connector, TieredConnector)
    return engine.kv_connector


def redis_of(engine: Engine) -> RedisStore:
    (store,) = tiers_of(engine).stores
    assert isinstance(store, RedisStore)
    return store


def test_a_prefix_evicted_from_the_pool_is_restored_from_redis(llama: str, redis_url: str) -> None:
    plain, tiered = make(llama), make(llama, kv_remote_url=redis_url)
    prefix, fillers = evicting_workload(plain)
    prompts = [prefix + [5, 6, 7], *fillers, prefix + [8, 9]]
    want = run_one_by_one(plain, prompts)
    got = run_one_by_one(tiered, prompts)
    assert token_ids(got) == token_ids(want)
    assert_same_logprobs(got, want)
    assert want[-1].num_cached_tokens == 0  # the pool alone lost the prefix
    assert got[-1].num_cached_tokens == 64  # all four prefix blocks came back from Redis
    assert redis_of(tiered).stats.hits == 4 and redis_of(tiered).stats.errors == 0
    tiered.scheduler.check_invariants()
    assert_no_blocks_held(tiered)


SECOND_ENGINE = """
import json, sys
from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.sampling_params import SamplingParams
from tests.helpers import run_engine
config, prompt = json.loads(sys.argv[1]), json.loads(sys.argv[2])
engine = Engine(EngineConfig(**config))
params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
(out,) = run_engine(engine, [prompt], params)
print(json.dumps([out.outputs[0].token_ids, out.num_cached_tokens]))
"""


def test_two_engine_processes_share_one_redis(llama: str, redis_url: str) -> None:
    first = make(llama, kv_remote_url=redis_url)
    (prompt,) = random_prompts(first.model_config.vocab_size, [50], seed=7)
    want = run_engine(first, [prompt], PARAMS)
    assert want[0].num_cached_tokens == 0
    assert first.flush_kv_saves(timeout=60)  # Redis is written in the background
    config = dict(ENGINE_ARGS, model=str(llama), kv_remote_url=redis_url)
    result = subprocess.run(
        [sys.executable, "-c", SECOND_ENGINE, json.dumps(config), json.dumps(prompt)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    tokens, num_cached_tokens = json.loads(result.stdout.strip().splitlines()[-1])
    assert tokens == want[0].outputs[0].token_ids
    assert num_cached_tokens == 48  # the three full blocks of 50 tokens, computed by the first


def run_killing_redis_after_one_step(
    engine: Engine, prompt: list[int], server: RedisServer
) -> RequestOutput:
    """Run one request, killing Redis between its first and second step."""
    engine.add_request("killed-mid-run", {"prompt_token_ids": prompt}, PARAMS)
    outputs: list[RequestOutput] = []
    while engine.has_unfinished_requests():
        outputs += [output for output in engine.step() if output.finished]
        engine.scheduler.check_invariants()
        assert engine.flush_kv_saves(timeout=60)  # one failure at a time: counts are exact
        server.kill()  # the first time kills it; then a no-op
    assert_no_blocks_held(engine)
    (output,) = outputs
    return output


def reconnect(store: RedisStore, clock: FakeClock) -> None:
    """Let the backoff pass and call until the store reaches Redis again. A real clock would
    retry a transient failure (a slow first reply on a loaded machine) after the next delay;
    the fake one has to be moved on for each retry."""
    for _ in range(5):
        clock.now += MAX_BACKOFF_S
        store.num_leading([bytes(32)])
        if store.is_up:
            return
    pytest.fail(f"the Redis tier did not come back: {store.stats}")


def test_redis_killed_mid_run_costs_hits_not_tokens_and_hits_come_back(
    llama: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvserve")  # each failed retry, if one fails
    plain = make(llama)
    prefix, fillers = evicting_workload(plain)
    (later,) = random_prompts(plain.model_config.vocab_size, [64], seed=3)
    prompts = [prefix + [5, 6, 7], *fillers, prefix + [8, 9]]  # Redis killed during fillers[0]
    prompts += [later + [5], *fillers, later + [6]]  # after Redis came back
    want = run_one_by_one(plain, prompts)
    clock = FakeClock()
    params = plain.block_hash_params
    store = RedisStore(redis_server.url, params, clock=clock)
    # `always`, as ENGINE_ARGS: under `auto` a fast machine recomputes the 4 blocks instead
    tiered = make(llama, TieredConnector([store], params, restore="always"))
    got = run_one_by_one(tiered, prompts[:1])  # its prefix blocks are in Redis
    got.append(run_killing_redis_after_one_step(tiered, prompts[1], redis_server))
    got += run_one_by_one(tiered, prompts[2:6])
    assert got[5].num_cached_tokens == 0  # evicted from the pool, and Redis is gone
    assert store.stats.errors == 1  # the first failed call; the rest skipped while down
    redis_server.start()  # back, empty
    reconnect(store, clock)
    errors = store.stats.errors
    got += run_one_by_one(tiered, prompts[6:])
    assert token_ids(got) == token_ids(want)
    assert_same_logprobs(got, want)
    assert got[-1].num_cached_tokens == 64, store.stats  # written after it came back, restored
    assert store.stats.errors == errors
    tiered.kv_connector.check_invariants()


def tamper(client: redis.Redis, keys: list[bytes], how: str) -> None:
    """Swap the first two entries' values, or corrupt or truncate every entry."""
    values = [client.get(key) for key in keys]
    if how == "swap":  # two valid entries under each other's key
        client.set(keys[0], values[1])
        client.set(keys[1], values[0])
        return
    for key, value in zip(keys, values, strict=True):
        assert isinstance(value, bytes)
        if how == "corrupt":  # one flipped byte in the middle
            middle = len(value) // 2
            value = value[:middle] + bytes([value[middle] ^ 0xFF]) + value[middle + 1 :]
        else:  # truncated
            value = value[: len(value) - 10]
        client.set(key, value)


@pytest.mark.parametrize("how", ["corrupt", "truncate", "swap"])
def test_tampered_entries_in_redis_are_misses_never_wrong_tokens(
    llama: str, redis_server: RedisServer, how: str
) -> None:
    first = make(llama, kv_remote_url=redis_server.url)
    (prompt,) = random_prompts(first.model_config.vocab_size, [50], seed=8)
    want = run_engine(first, [prompt], PARAMS)
    assert first.flush_kv_saves(timeout=60)
    store = redis_of(first)
    keys = [store.redis_key(h) for h in first.block_hash_params.block_hashes(prompt)]
    assert sorted(redis_server.client().keys("*")) == sorted(keys)  # three full blocks
    tamper(redis_server.client(), keys, how)
    second = make(llama, kv_remote_url=redis_server.url)
    got = run_engine(second, [prompt], PARAMS)
    assert second.flush_kv_saves(timeout=60)
    assert token_ids(got) == token_ids(want)
    assert_same_logprobs(got, want)
    assert got[0].num_cached_tokens == 0
    assert tiers_of(second).num_unreadable == 1  # the first block ends the chain
    assert redis_of(second).stats.errors == 0
    third = make(llama, kv_remote_url=redis_server.url)  # the second engine rewrote them
    assert run_engine(third, [prompt], PARAMS)[0].num_cached_tokens == 48


def test_a_wrong_secret_reads_entries_as_misses(llama: str, redis_url: str) -> None:
    writer = make(llama, kv_remote_url=redis_url, kv_remote_secret="x")
    (prompt,) = random_prompts(writer.model_config.vocab_size, [50], seed=9)
    want = run_engine(writer, [prompt], PARAMS)
    assert writer.flush_kv_saves(timeout=60)
    same = make(llama, kv_remote_url=redis_url, kv_remote_secret="x")
    assert run_engine(same, [prompt], PARAMS)[0].num_cached_tokens == 48
    for secret in ("y", None):
        other = make(llama, kv_remote_url=redis_url, kv_remote_secret=secret)
        got = run_engine(other, [prompt], PARAMS)
        assert token_ids(got) == token_ids(want)
        assert got[0].num_cached_tokens == 0
        assert tiers_of(other).num_unreadable == 1


def test_an_unreachable_redis_at_start_leaves_the_engine_serving(llama: str) -> None:
    plain = make(llama)
    tiered = make(llama, kv_remote_url=f"redis://127.0.0.1:{free_port()}/0")
    (prompt,) = random_prompts(plain.model_config.vocab_size, [50], seed=10)
    assert token_ids(run_engine(tiered, [prompt], PARAMS)) == token_ids(
        run_engine(plain, [prompt], PARAMS)
    )
    assert redis_of(tiered).stats.errors >= 1  # the start-up PING (and a retry per backoff)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"cache_mode": "contiguous"}, "kv_remote_url"),
        ({"enable_prefix_caching": False}, "kv_remote_url"),
    ],
)
def test_redis_tier_arguments_are_checked(
    llama: str, changes: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        make(llama, kv_remote_url="redis://127.0.0.1:1/0", **changes)


def test_a_sliding_window_model_names_kv_remote_url(tiny_checkpoints: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="^kv_remote_url:"):
        make(tiny_checkpoints["mistral"], kv_remote_url="redis://127.0.0.1:1/0")


def test_all_tiers_together_with_seeded_sampling(
    llama: str, redis_url: str, tmp_path: Path
) -> None:
    """CPU and disk tiers too small for the prefix, Redis holding everything: the chain looks
    through CPU and disk and restores the prefix from Redis; seeded samples equal the plain
    engine's."""
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=6, ignore_eos=True)
    plain = make(llama)
    prefix, fillers = evicting_workload(plain)
    prompts = [prefix + [5, 6, 7], *fillers, prefix + [8, 9]]
    want = [run_engine(plain, [prompt], seeded)[0] for prompt in prompts]
    probe = make(llama, kv_disk_dir=str(tmp_path / "probe"))
    run_engine(probe, [prefix], PARAMS)
    probe.close()
    entry = max(path.stat().st_size for path in (tmp_path / "probe").rglob("*.kv"))
    tiered = make(
        llama,
        kv_cpu_bytes=2 * entry,
        kv_disk_dir=str(tmp_path / "kv"),
        kv_disk_bytes=3 * entry,
        kv_remote_url=redis_url,
    )
    got = []
    for prompt in prompts:
        got.append(run_engine(tiered, [prompt], seeded)[0])
        assert tiered.flush_kv_saves(timeout=60)
        tiered.scheduler.check_invariants()
    assert token_ids(got) == token_ids(want)
    assert got[-1].num_cached_tokens == 64
    assert got[-1].num_cached_tokens_by_tier == {"redis": 64}  # evicted from CPU and disk
    metrics = tiered.get_metrics().kv_tiers
    assert metrics["cpu"].evictions > 0 and metrics["disk"].evictions > 0
    assert metrics["redis"].hits == 4 and metrics["redis"].errors == 0
    assert_no_blocks_held(tiered)
    tiered.close()
