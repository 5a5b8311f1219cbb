"""SLO admission in the server: `--slo-ttft-ms` / `--slo-tpot-ms` answer 429 before prefill.

    engine thread                                  event loop
    after applying commands and after each step:   a request, tokenized:
      publish(applied seq, load, rates) ---------->  load + requests submitted since
                                                     -> predict (engine/slo.py)
                                                     miss: SLOMiss (429, Retry-After)
                                                     else: seq = admit(tokens, seqs)

The engine thread owns the engine, so the loop never reads its queues: it reads the last
snapshot the engine thread published (one tuple, replaced whole) and adds the requests it has
admitted since, which the snapshot does not count yet (a burst of arrivals between two steps
then sees its own queue grow).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from kvserve.engine.slo import SLO, EngineLoad, StepRates, predict, rejection


class SLOMiss(Exception):
    """A request predicted to miss an objective of the server (answered 429)."""

    def __init__(self, objective: str, message: str) -> None:
        super().__init__(message)
        self.objective = objective  # "ttft" or "tpot"


class _Snapshot(NamedTuple):
    applied_seq: int  # the last admitted request the engine had queued
    load: EngineLoad
    rates: StepRates


class SLOGate:
    """Predicts each arriving request's latency and turns away those that would miss `slo`.

    `publish` runs on the engine thread; `admit` on the event loop only.
    """

    def __init__(self, slo: SLO) -> None:
        self.slo = slo
        self._snapshot = _Snapshot(0, EngineLoad(0, 0), StepRates())
        self._next_seq = 1
        self._pending: deque[tuple[int, int, int]] = deque()  # (seq, tokens, seqs) admitted

    def publish(self, applied_seq: int, load: EngineLoad, rates: StepRates) -> None:
        """The engine's load and rates, with every request up to `applied_seq` queued
        (`rates` is kept as given: pass a copy the engine will not update)."""
        self._snapshot = _Snapshot(applied_seq, load, rates)

    def admit(self, num_prompt_tokens: int, num_seqs: int) -> int:
        """The sequence number to queue the request under.

        Raises:
            SLOMiss: it is predicted to miss an objective; nothing was queued.
        """
        snapshot = self._snapshot
        while self._pending and self._pending[0][0] <= snapshot.applied_seq:
            self._pending.popleft()  # counted by the engine's load now
        load = EngineLoad(
            snapshot.load.num_queued_prefill_tokens + sum(p[1] for p in self._pending),
            snapshot.load.num_decoding + sum(p[2] for p in self._pending),
        )
        miss = rejection(predict(load, snapshot.rates, num_prompt_tokens, num_seqs), self.slo)
        if miss is not None:
            raise SLOMiss(miss.objective, miss.message)
        seq = self._next_seq
        self._next_seq += 1
        self._pending.append((seq, num_prompt_tokens, num_seqs))
        return seq

    def release(self, seq: int) -> None:
        """Forget admission `seq`, which will not reach the engine after all (a reservation
        `kvserve cluster` made for a request that ended or was refused elsewhere)."""
        self._pending = deque(p for p in self._pending if p[0] != seq)
