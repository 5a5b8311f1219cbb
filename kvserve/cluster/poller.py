"""The ingress's view of its replicas, kept fresh: a thread that polls every replica.

every `interval_s`:  replica.poll() for each replica without a poll in flight
                     (one slow or restarting replica delays only its own news)
each answer      ->  on_report(index, ReplicaReport): KV events, metrics, load
a dead replica   ->  on_down(index): Ray restarts it; its polls go on until it answers
"""

from __future__ import annotations

import threading
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
    ) -> None:
        self.handles = handles
        self.on_report = on_report
        self.on_down = on_down
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvserve-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        pending: dict[int, Any] = {}  # replica -> its poll in flight
        while not self._stopping.wait(self.interval_s):
            for index, handle in enumerate(self.handles):
                if index not in pending:
                    pending[index] = handle.poll.remote()
            refs = {ref: index for index, ref in pending.items()}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.interval_s)
            for ref in ready:
                index = refs[ref]
                del pending[index]
                try:
                    report = ray.get(ref)
                except RayActorError:
                    self.on_down(index)
                    continue
                self.on_report(index, report)
