"""SLO admission across replicas (`kvserve cluster --slo-ttft-ms T --slo-tpot-ms P`), as
Mooncake's conductor does it: predict before any prefill, reject what would miss.

    request ──router──> replica r (its match: k cached blocks)
      predict on r: TTFT = (prefill tokens queued on r + the request's uncached ones)
                           / r's measured prefill rate;  TPOT = r's step time with it added
      meets the SLO -> r          misses -> the least loaded replica, predicted the same way
      both miss -> 429 (SLOMiss, Retry-After), nothing prefilled anywhere

One `SLOGate` (server/slo_gate.py) per replica, fed by the replica's polls (its load and
rates, and the last admitted request it has queued): a burst between two polls still sees
the requests admitted to each replica since. Uncached tokens are the prompt minus the blocks
the replica's prefix index says it holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvserve.cluster.routing import Choice, ReplicaState
from kvserve.engine.slo import SLO
from kvserve.server.engine_commands import LoadReport
from kvserve.server.slo_gate import SLOGate, SLOMiss


class ClusterAdmission:
    """Per-replica SLO gates; `admit` picks where a request can still meet the SLO."""

    def __init__(self, slo: SLO, num_replicas: int, block_size: int) -> None:
        self.slo = slo
        self.block_size = block_size
        self.gates = [SLOGate(slo) for _ in range(num_replicas)]

    def publish(self, index: int, report: LoadReport) -> None:
        """A poll of replica `index`: its load, rates and last queued admission."""
        self.gates[index].publish(*report)

    def restart(self, index: int) -> None:
        """Replica `index` restarted: nothing it was sent is queued there any more."""
        self.gates[index] = SLOGate(self.slo)

    def admit(
        self,
        replicas: Sequence[ReplicaState],
        choice: Choice,
        fallback: int,
        block_hashes: Sequence[bytes],
        num_prompt_tokens: int,
        num_seqs: int,
    ) -> tuple[int, int]:
        """(replica, its gate's sequence number) for a request the router sent to `choice`,
        with `fallback` (the least loaded replica) as the second try.

        Raises:
            SLOMiss: predicted to miss on both; nothing was admitted.
        """
        first_miss: SLOMiss | None = None
        for index in dict.fromkeys((choice.replica, fallback)):
            cached = replicas[index].match(block_hashes) * self.block_size
            uncached = max(1, num_prompt_tokens - cached)
            try:
                return index, self.gates[index].admit(uncached, num_seqs)
            except SLOMiss as miss:
                first_miss = first_miss or miss
        assert first_miss is not None
        raise first_miss
