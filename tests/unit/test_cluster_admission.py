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


def decode_rates(step_s_per_row: float) -> StepRates:
    """Decode steps that take `step_s_per_row` seconds a row (two batch sizes seen)."""
    measured = StepRates(weight=0.5)
    for rows in (1, 4, 1, 4):
        measured.observe(rows, rows, rows * step_s_per_row)
    return measured


def disaggregated() -> ClusterAdmission:
    """Replica 0 prefills (1,000 tokens a second), replicas 1 and 2 decode (10 ms a row);
    TTFT objective 1 s, TPOT 50 ms. Replica 1 runs 3 decodes, replica 2 none."""
    gates = ClusterAdmission(SLO(ttft_s=1.0, tpot_s=0.05), 3, PARAMS.block_size, [1, 2])
    both = StepRates(weight=1.0)
    both.observe(1000, 0, 1.0)
    both.observe(4, 4, 4.0)  # a decode step of 4 rows in 4 s: would miss any TPOT
    gates.publish(0, LoadReport(0, EngineLoad(0, 0), both))
    gates.publish(1, LoadReport(0, EngineLoad(0, 3), decode_rates(0.01)))
    gates.publish(2, LoadReport(0, EngineLoad(0, 0), decode_rates(0.01)))
    return gates


def test_each_stage_is_held_to_its_own_objective():
    gates = disaggregated()
    replicas = [ReplicaState() for _ in range(3)]
    # the prefill replica's own decode steps are slow, but it only prefills: TTFT alone
    assert gates.admit(replicas, Choice(0, 0, "load"), 0, [], 900, 1) == (0, 1)
    with pytest.raises(SLOMiss) as miss:  # 900 queued + 200 = 1.1 s
        gates.admit(replicas, Choice(0, 0, "load"), 0, [], 200, 1)
    assert miss.value.objective == "ttft"


def test_a_decode_seat_is_reserved_where_the_step_time_meets_the_tpot():
    gates = disaggregated()
    assert gates.admit_decode([1, 2], 1) == (1, 1)  # 3 + 1 rows: 40 ms
    assert gates.admit_decode([1, 2], 2) == (2, 1)  # 4 + 2 rows on 1: 60 ms; 2 rows on 2
    with pytest.raises(SLOMiss) as miss:  # 7 rows on 1, 6 on 2: both over 50 ms
        gates.admit_decode([1, 2], 4)
    assert miss.value.objective == "tpot"


def test_a_reservation_released_frees_its_seat():
    gates = disaggregated()
    index, seq = gates.admit_decode([2], 5)  # 5 rows: 50 ms, just meets it
    with pytest.raises(SLOMiss):
        gates.admit_decode([2], 1)
    gates.release(index, seq)  # the request ended on the prefill replica
    assert gates.admit_decode([2], 5)[0] == 2
