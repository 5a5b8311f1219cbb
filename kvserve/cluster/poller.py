"""The ingress's view of its replicas, kept fresh: a thread that long-polls every replica.

for each replica, one poll(wait_s) in flight: the replica answers at once with the KV events
                     its engine recorded, or as soon as it records some, or after `wait_s`
                     with none (metrics and load all the same); the next poll of a replica
                     goes out no sooner than `interval_s` after its last
each answer      ->  on_report(index, ReplicaReport): KV events, metrics, load
a dead replica   ->  on_down(index): Ray restarts it; its polls go on until it answers

An idle replica costs a call every `wait_s`, a busy one at most one every `interval_s` (a
poll every 20 ms of each replica, answered or not, cost an idle cluster a fifth of a core).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

from kvserve.cluster.replica import ReplicaReport


class ReplicaPoller:
    """Polls `handles` on a daemon thread until `stop`."""

    def __init__(
        self,
        handles: list[Any],
        on_report: Callable[[int, ReplicaReport], None],
        on_down: Callable[[int], None],
        interval_s: float = 0.02,
        wait_s: float = 0.5,
    ) -> None:
        self.handles = handles
        self.on_report = on_report
        self.on_down = on_down
        self.interval_s = interval_s
        self.wait_s = wait_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvserve-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        pending: dict[Any, int] = {}  # poll in flight -> its replica
        next_poll = [0.0] * len(self.handles)  # when each replica may be polled again
        while not self._stopping.is_set():
            now = time.monotonic()
            polled = set(pending.values())
            for index, handle in enumerate(self.handles):
                if index not in polled and now >= next_poll[index]:
                    pending[handle.poll.remote(self.wait_s)] = index
                    next_poll[index] = now + self.interval_s
            polled = set(pending.values())
            waiting = [next_poll[i] - now for i in range(len(self.handles)) if i not in polled]
            timeout = max(0.001, min([0.1, *waiting]))
            if not pending:
                self._stopping.wait(timeout)
                continue
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            for ref in ready:
                index = pending.pop(ref)
                try:
                    report = ray.get(ref)
                except RayActorError:
                    self.on_down(index)
                    continue
                self.on_report(index, report)
