"""SLO admission across replicas (kvserve/cluster/admission.py), with fixed rates: pinned."""

import pytest

from kvserve.cluster.admission import ClusterAdmission
from kvserve.cluster.routing import Choice, ReplicaState
from kvserve.engine.slo import SLO, EngineLoad, StepRates
from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_events import BlockStored
from kvserve.server.engine_commands import LoadReport
from kvserve.server.slo_gate import SLOMiss

PARAMS = BlockHashParams(16, "fp", "float32")


def rates(prefill_tokens_per_s: float) -> StepRates:
    measured = StepRates(weight=1.0)
    measured.observe(int(prefill_tokens_per_s), 0, 1.0)  # one prefill step of 1 s
    return measured


def admission(queued: list[int]) -> ClusterAdmission:
    """Two replicas prefilling 1,000 tokens a second, with `queued` tokens waiting on each."""
    gates = ClusterAdmission(SLO(ttft_s=1.0), 2, PARAMS.block_size)
    for index, tokens in enumerate(queued):
        gates.publish(index, LoadReport(0, EngineLoad(tokens, 0), rates(1000)))
    return gates


def test_admits_on_the_routers_choice_when_it_meets_the_slo():
    replicas = [ReplicaState(), ReplicaState()]
    index, seq = admission([500, 0]).admit(replicas, Choice(0, 0, "load"), 1, [], 400, 1)
    assert (index, seq) == (0, 1)  # 900 tokens / 1,000 per s = 0.9 s <= 1 s


def test_a_miss_on_the_choice_tries_the_least_loaded_then_rejects():
    replicas = [ReplicaState(), ReplicaState()]
    gates = admission([800, 100])
    assert gates.admit(replicas, Choice(0, 0, "prefix"), 1, [], 400, 1) == (1, 1)
    # replica 1 now has 100 + 400 queued: another 600 tokens miss there too
    with pytest.raises(SLOMiss) as miss:
        gates.admit(replicas, Choice(0, 0, "prefix"), 1, [], 600, 1)
    assert miss.value.objective == "ttft"


def test_cached_blocks_on_the_replica_are_not_counted_as_prefill():
    prompt = list(range(900))
    hashes = PARAMS.block_hashes(prompt)
    replicas = [ReplicaState(), ReplicaState()]
    replicas[0].apply(BlockStored(h, i) for i, h in enumerate(hashes[:50]))  # 800 tokens
    gates = admission([600, 600])
    # on replica 0: 600 queued + 100 uncached = 0.7 s; on replica 1 it would be 1.5 s
    assert gates.admit(replicas, Choice(0, 50, "prefix"), 1, hashes, 900, 1) == (0, 1)
    with pytest.raises(SLOMiss):
        gates.admit(replicas, Choice(1, 0, "load"), 1, hashes, 900, 1)


def test_a_restarted_replica_forgets_what_was_admitted_to_it():
    replicas = [ReplicaState(), ReplicaState()]
    gates = admission([0, 0])
    assert gates.admit(replicas, Choice(0, 0, "load"), 0, [], 900, 1) == (0, 1)
    with pytest.raises(SLOMiss):  # 900 admitted, not yet queued there: 1.8 s
        gates.admit(replicas, Choice(0, 0, "load"), 0, [], 900, 1)
    gates.restart(0)
    gates.publish(0, LoadReport(0, EngineLoad(0, 0), rates(1000)))
    assert gates.admit(replicas, Choice(0, 0, "load"), 0, [], 900, 1) == (0, 1)
