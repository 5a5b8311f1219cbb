"""The routers of `kvserve cluster` (kvserve/cluster/routing.py): pure bookkeeping, pinned."""

import pytest

from kvserve.cluster.routing import NoReplicaUp, ReplicaState, Router
from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

PARAMS = BlockHashParams(4, "model-fp", "float32")


def stored(hashes):
    return [BlockStored(h, i) for i, h in enumerate(hashes)]


def test_index_follows_stored_removed_and_cleared_events():
    hashes = PARAMS.block_hashes(list(range(12)))
    replica = ReplicaState()
    replica.apply(stored(hashes))
    assert replica.match(hashes) == 3
    replica.apply([BlockRemoved(hashes[1], 1)])
    assert replica.match(hashes) == 1  # a hole ends the match: h2 alone is not a prefix hit
    replica.apply([AllBlocksCleared()])
    assert replica.blocks == set() and replica.match(hashes) == 0


def test_match_counts_leading_blocks_of_another_prompt_with_the_same_prefix():
    replica = ReplicaState()
    replica.apply(stored(PARAMS.block_hashes(list(range(12)))))
    other = PARAMS.block_hashes(list(range(8)) + [99, 98, 97, 96, 5])
    assert replica.match(other) == 2
    salted = PARAMS.block_hashes(list(range(12)), cache_salt="tenant-a")
    assert replica.match(salted) == 0


def test_round_robin_takes_turns_and_skips_replicas_down():
    router = Router("round-robin")
    replicas = [ReplicaState(), ReplicaState(), ReplicaState()]
    assert [router.choose(replicas, []).replica for _ in range(4)] == [0, 1, 2, 0]
    replicas[1].up = False
    assert [router.choose(replicas, []).replica for _ in range(3)] == [2, 0, 2]


def test_least_load_picks_fewest_in_flight_then_turns_among_equals():
    router = Router("least-load")
    replicas = [ReplicaState(in_flight=3), ReplicaState(in_flight=1), ReplicaState(in_flight=1)]
    assert [router.choose(replicas, []).replica for _ in range(3)] == [1, 2, 1]
    assert router.choose(replicas, []).reason == "load"


def test_cache_aware_prefers_the_longest_prefix():
    hashes = PARAMS.block_hashes(list(range(16)))
    replicas = [ReplicaState(), ReplicaState(), ReplicaState()]
    replicas[0].apply(stored(hashes[:1]))
    replicas[2].apply(stored(hashes[:3]))
    replicas[2].in_flight = 2
    choice = Router("cache-aware").choose(replicas, hashes)
    assert choice == (2, 3, "prefix")


def test_cache_aware_falls_back_to_least_load_past_the_margin_or_without_a_match():
    hashes = PARAMS.block_hashes(list(range(16)))
    replicas = [ReplicaState(in_flight=6), ReplicaState(in_flight=1)]
    replicas[0].apply(stored(hashes))
    assert Router("cache-aware", overload_margin=5).choose(replicas, hashes) == (0, 4, "prefix")
    assert Router("cache-aware", overload_margin=4).choose(replicas, hashes) == (1, 0, "load")
    fresh = PARAMS.block_hashes([7] * 16)
    assert Router("cache-aware").choose(replicas, fresh) == (1, 0, "load")


def test_cache_aware_skips_a_replica_down_even_with_the_longest_match():
    hashes = PARAMS.block_hashes(list(range(16)))
    replicas = [ReplicaState(), ReplicaState()]
    replicas[0].apply(stored(hashes))
    replicas[0].up = False
    assert Router("cache-aware").choose(replicas, hashes).replica == 1


def test_no_replica_up_and_bad_arguments():
    with pytest.raises(NoReplicaUp):
        Router("least-load").choose([ReplicaState(up=False)], [])
    with pytest.raises(ValueError, match="router:"):
        Router("random")
    with pytest.raises(ValueError, match="overload_margin:"):
        Router("cache-aware", overload_margin=-1)
