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

Disaggregated (`--prefill-replicas`), each stage is held to its own objective: a prefill
replica to the TTFT, a decode replica to the TPOT. A request first reserves its seat on a
decode replica (`admit_decode`: that replica's step time with every request already headed
there, reserved or running, plus this one), then is admitted to a prefill replica; a miss at
either is a 429 before any prefill, and a reservation not used is released.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvserve.cluster.routing import Choice, ReplicaState
from kvserve.engine.slo import SLO
from kvserve.server.engine_commands import LoadReport
from kvserve.server.slo_gate import SLOGate, SLOMiss


class ClusterAdmission:
    """Per-replica SLO gates; `admit` picks where a request can still meet the SLO."""

    def __init__(
        self, slo: SLO, num_replicas: int, block_size: int, decode_ids: Sequence[int] = ()
    ) -> None:
        """`decode_ids`: the decode replicas of a disaggregated cluster (held to the TPOT;
        the others then to the TTFT)."""
        self.block_size = block_size
        self.slos = [slo] * num_replicas
        if decode_ids:
            self.slos = [
                SLO(tpot_s=slo.tpot_s) if index in decode_ids else SLO(ttft_s=slo.ttft_s)
                for index in range(num_replicas)
            ]
        self.gates = [SLOGate(objective) for objective in self.slos]

    def publish(self, index: int, report: LoadReport) -> None:
        """A poll of replica `index`: its load, rates and last queued admission."""
        self.gates[index].publish(*report)

    def restart(self, index: int) -> None:
        """Replica `index` restarted: nothing it was sent is queued there any more."""
        self.gates[index] = SLOGate(self.slos[index])

    def release(self, index: int, seq: int) -> None:
        """Admission `seq` to replica `index` will not be sent there after all."""
        self.gates[index].release(seq)

    def admit_decode(self, order: Sequence[int], num_seqs: int) -> tuple[int, int]:
        """(decode replica, its gate's sequence number): the first of `order` whose step
        time with `num_seqs` more rows meets the TPOT; the seat stays reserved until the
        request reaches it (or `release`).

        Raises:
            SLOMiss: none of `order` would meet it.
        """
        first_miss: SLOMiss | None = None
        for index in order:
            try:
                return index, self.gates[index].admit(1, num_seqs)
            except SLOMiss as miss:
                first_miss = first_miss or miss
        assert first_miss is not None, "no decode replica to try"
        raise first_miss

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
