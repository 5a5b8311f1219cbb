"""Which replica gets a request: round-robin, least-load, or the one holding its prefix.

    request token ids --(each replica's BlockHashParams)--> block hashes h0 h1 h2 ...
    replica r's index: the hashes r announced (BlockStored) and has not evicted (BlockRemoved)
    match(r) = how many leading hashes r holds (hashes are chained: h2 names h0..h2)

    cache-aware:  the replica with the longest match, unless its in-flight requests exceed
                  the least loaded replica's by more than `overload_margin`: then the least
                  loaded (a hot prefix must not pile every request onto one engine)
    least-load:   fewest in-flight requests (sequences), ties broken in turn
    round-robin:  in turn

Only replicas marked up are chosen. Everything here is pure bookkeeping on the ingress's
event loop: the cluster engine feeds it events and request starts / ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kvserve.kv.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

ROUTERS = ("round-robin", "least-load", "cache-aware")


class NoReplicaUp(RuntimeError):
    """Every replica is down (restarting): nothing can take the request now."""


@dataclass
class ReplicaState:
    """What the ingress knows of one replica: up or not, its prefix index, its load."""

    up: bool = True
    blocks: set[bytes] = field(default_factory=set)
    in_flight: int = 0  # sequences routed to it and not finished

    def apply(self, events: Iterable[KVEvent]) -> None:
        """Replay the replica's stored / removed events, oldest first."""
        for event in events:
            if isinstance(event, BlockStored):
                self.blocks.add(event.block_hash)
            elif isinstance(event, BlockRemoved):
                self.blocks.discard(event.block_hash)
            elif isinstance(event, AllBlocksCleared):
                self.blocks.clear()

    def match(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the hash chain this replica holds."""
        for index, block_hash in enumerate(block_hashes):
            if block_hash not in self.blocks:
                return index
        return len(block_hashes)


class Choice(NamedTuple):
    """The chosen replica, how many of the request's blocks it holds, and why it won:
    "prefix" (longest match), "load" (least loaded) or "turn" (round-robin)."""

    replica: int
    matched_blocks: int
    reason: str


class Router:
    """Chooses a replica for each request (see the module docstring)."""

    def __init__(self, policy: str, overload_margin: int = 4) -> None:
        if policy not in ROUTERS:
            raise ValueError(f"router: must be one of {ROUTERS}, got {policy!r}")
        if overload_margin < 0:
            raise ValueError(f"overload_margin: must be >= 0, got {overload_margin}")
        self.policy = policy
        self.overload_margin = overload_margin
        self._turn = 0

    def choose(
        self,
        replicas: Sequence[ReplicaState],
        block_hashes: Sequence[bytes],
        among: Sequence[int] | None = None,
    ) -> Choice:
        """The replica for a request whose prompt has `block_hashes` (may be empty), among
        the replicas `among` (default: all; the prefill replicas of a disaggregated cluster).

        Raises:
            NoReplicaUp: no replica (of `among`) is up.
        """
        up = _up(replicas, among)
        if not up:
            raise NoReplicaUp("no engine replica is up (restarting); retry shortly")
        if self.policy == "round-robin":
            index = self._next_in_turn(up, len(replicas))
            return Choice(index, replicas[index].match(block_hashes), "turn")
        least = self._least_loaded(replicas, up)
        if self.policy == "cache-aware":
            matches = {index: replicas[index].match(block_hashes) for index in up}
            best = max(up, key=lambda index: (matches[index], -replicas[index].in_flight))
            overloaded = replicas[best].in_flight > replicas[least].in_flight + self.overload_margin
            if matches[best] > 0 and not overloaded:
                return Choice(best, matches[best], "prefix")
            return Choice(least, matches[least], "load")
        return Choice(least, replicas[least].match(block_hashes), "load")

    def _next_in_turn(self, candidates: list[int], num_replicas: int) -> int:
        """The first candidate at or after the turn; the turn then moves past it."""
        for offset in range(num_replicas):
            index = (self._turn + offset) % num_replicas
            if index in candidates:
                self._turn = index + 1
                return index
        raise AssertionError("unreachable: `candidates` is not empty")

    def least_loaded(
        self, replicas: Sequence[ReplicaState], among: Sequence[int] | None = None
    ) -> int:
        """The replica up (of `among`) with the fewest sequences in flight (the first of
        equals).

        Raises:
            NoReplicaUp: no replica (of `among`) is up.
        """
        up = _up(replicas, among)
        if not up:
            raise NoReplicaUp("no engine replica is up (restarting); retry shortly")
        return min(up, key=lambda index: replicas[index].in_flight)  # leaves the turn alone

    def _least_loaded(self, replicas: Sequence[ReplicaState], up: list[int]) -> int:
        """Fewest in-flight sequences; among equals, the first at or after the turn."""
        fewest = min(replicas[index].in_flight for index in up)
        fewest_up = [index for index in up if replicas[index].in_flight == fewest]
        return self._next_in_turn(fewest_up, len(replicas))


def _up(replicas: Sequence[ReplicaState], among: Sequence[int] | None) -> list[int]:
    candidates = range(len(replicas)) if among is None else among
    return [index for index in candidates if replicas[index].up]
