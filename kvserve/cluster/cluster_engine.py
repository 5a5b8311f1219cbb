"""`kvserve cluster`'s engine: several engine replicas (Ray actors) behind the interface the
OpenAI server already serves (`AsyncEngine`'s), so the API, streaming and limits are the same.

    HTTP request -> Serving -> ClusterEngine.generate:
        tokenize here (the router needs token ids) -> block hashes -> Router.choose
        -> replica.submit; its outputs come with every other request's on that replica, one
           Ray call a step (channel.py), and are yielded as they arrive
    a poller thread (poller.py): each replica's KV events (as they come), metrics, load
        -> the router's per-replica prefix index; /metrics sums the replicas

Faults: a replica that dies is restarted by Ray (`max_restarts`). Its requests that had
streamed nothing are retried on another replica; the others end with EngineDeadError (a 500
or an error event naming the replica). The router skips it until a poll answers again (a new
incarnation: its index is cleared). A consumer that goes away aborts the request on the
replica, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, Callable
from functools import partial
from typing import Any

import ray
from prometheus_client.registry import Collector
from ray.exceptions import RayTaskError

from kvserve.cluster import handoff
from kvserve.cluster.admission import ClusterAdmission
from kvserve.cluster.channel import ReplicaChannel, ReplicaLost
from kvserve.cluster.metrics import RetiredCounters, RoutingCollector, sum_metrics
from kvserve.cluster.poller import ReplicaPoller
from kvserve.cluster.replica import EngineReplica, ReplicaInfo, ReplicaReport
from kvserve.cluster.routing import NoReplicaUp, ReplicaState, Router
from kvserve.config import EngineConfig
from kvserve.engine.prompts import PromptInput, tokenize_prompt
from kvserve.engine.slo import SLO
from kvserve.outputs import EngineMetrics, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.async_engine import EngineDeadError
from kvserve.server.errors import Rejected

logger = logging.getLogger("kvserve")


class ClusterEngine:
    """Engine replicas on Ray behind one `generate`. Build with `ClusterEngine.start`."""

    def __init__(
        self,
        handles: list[Any],
        infos: list[ReplicaInfo],
        router: Router,
        slo: SLO | None = None,
        num_prefill: int = 0,
        transport: str = "object-store",
    ) -> None:
        """`num_prefill` > 0: the first replicas prefill, the others decode (`transport`:
        how the KV goes from one to the other, cluster/handoff.py)."""
        self.handles = handles
        self.router = router
        self.prefill_ids = list(range(num_prefill))
        self.decode_ids = list(range(num_prefill, len(handles))) if num_prefill else []
        self.transport = transport
        self.handoffs = handoff.HandoffStats()
        self.admission = None
        if slo is not None and any(value is not None for value in slo):
            block_size = infos[0].block_hash_params.block_size
            self.admission = ClusterAdmission(slo, len(handles), block_size, self.decode_ids)
        self.replicas = [ReplicaState() for _ in handles]
        self.incarnations = [info.incarnation for info in infos]
        self.info = infos[0]
        self.routed: dict[tuple[int, str], int] = {}  # (replica, reason) -> requests
        self._metrics: list[EngineMetrics | None] = [None] * len(handles)
        self._retired = RetiredCounters()
        self._lock = threading.Lock()  # the poller's updates vs the event loop's reads
        self._poller = ReplicaPoller(handles, self._absorb, self._mark_down)
        self.channels = [ReplicaChannel(h, i, self._mark_down) for i, h in enumerate(handles)]

    @classmethod
    def start(
        cls,
        config: EngineConfig,
        num_replicas: int,
        router: Router,
        replica_cpus: float = 1,
        slo: SLO | None = None,
        num_prefill: int = 0,
        transport: str = "object-store",
    ) -> ClusterEngine:
        """Create `num_replicas` replica actors on the Ray cluster `ray.init` joined (the
        caller's) and wait until each has loaded its engine. With `slo`, requests predicted
        to miss it on every replica tried are refused (cluster/admission.py). With
        `num_prefill`, that many replicas prefill and the rest decode (cluster/handoff.py).

        Raises:
            ValueError: a count or replica_cpus out of range, an unknown transport, or an
                invalid engine argument.
        """
        if num_replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {num_replicas}")
        if replica_cpus <= 0:
            raise ValueError(f"replica_cpus: must be > 0, got {replica_cpus}")
        if num_prefill:
            config = handoff.handoff_config(config, num_prefill, num_replicas, transport)
        actor: Any = ray.remote(EngineReplica).options(
            num_cpus=replica_cpus, max_restarts=-1, max_task_retries=0, max_concurrency=10_000
        )
        handles: list[Any] = [actor.remote(config) for _ in range(num_replicas)]
        try:
            infos = ray.get([handle.describe.remote() for handle in handles])
        except RayTaskError as error:
            for handle in handles:
                ray.kill(handle)
            raise _unwrap(error) from None
        return cls(handles, infos, router, slo, num_prefill, transport)

    @property
    def tokenizer(self) -> Any:
        return self.info.tokenizer

    @property
    def model_path(self) -> str:
        return self.info.model_path

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def max_num_seqs(self) -> int:
        """Requests the replicas run at once, all together."""
        return self.info.max_num_seqs * len(self.handles)

    def health(self) -> dict[str, Any]:
        """ "ok" with every replica up, "degraded" with some, "down" with none (503)."""
        num_up = sum(replica.up for replica in self.replicas)
        status = "ok" if num_up == len(self.replicas) else "degraded" if num_up else "down"
        return {"status": status, "replicas": len(self.replicas), "replicas_up": num_up}

    def collectors(self) -> list[Collector]:
        return [RoutingCollector(self)]

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def get_metrics(self) -> EngineMetrics:
        """The replicas' last reported metrics, summed (counters of restarted replicas kept)."""
        with self._lock:
            return sum_metrics([m for m in self._metrics if m is not None], self._retired)

    async def generate(
        self, request_id: str, prompt: PromptInput, params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Route the request and yield its cumulative outputs (AsyncEngine.generate's contract).

        Raises:
            ValueError: invalid prompt or parameters (nothing runs).
            Rejected: 503, every replica (of a stage) is down.
            SLOMiss: predicted to miss the SLO on the replicas tried (429, nothing ran).
            EngineDeadError: the replica died after the request had streamed.
        """
        tokenized = await asyncio.to_thread(tokenize_prompt, self.tokenizer, prompt)
        hashes = self.info.block_hash_params.block_hashes(
            tokenized.prompt_token_ids, tokenized.cache_salt
        )
        num_tokens = len(tokenized.prompt_token_ids)
        if self.prefill_ids:
            if params.max_tokens is None:  # resolved here: the plan needs it
                params = params.replace(max_tokens=max(1, self.max_model_len - num_tokens))
            run = handoff.disaggregated(self, request_id, tokenized, hashes, params)
            async for output in run:
                yield output
            return
        for _ in range(len(self.handles)):  # a replica that dies before streaming: next one
            index, seq = self.route(hashes, num_tokens, params.n)
            handle = self.handles[index]
            streamed = False
            try:
                submit = partial(handle.submit.remote, request_id, tokenized, params, seq)
                async for output in self.stream(index, request_id, params.n, submit):
                    streamed = True
                    yield output
                return
            except ReplicaLost as error:
                if streamed:
                    raise EngineDeadError(
                        f"engine replica {index} died while running the request"
                    ) from error
        raise EngineDeadError("every engine replica tried died before answering")

    async def stream(
        self, index: int, request_id: str, num_seqs: int, submit: Callable[[], Any]
    ) -> AsyncGenerator[Any, None]:
        """What request `request_id` brings from replica `index` after `submit()` (a call
        of the replica's `submit`), counted in flight there; a consumer that leaves aborts
        it on the replica (its KV blocks freed).

        Raises:
            ReplicaLost: the replica died (Ray restarts it).
            ValueError, EngineDeadError: what the replica reported.
        """
        replica = self.replicas[index]
        replica.in_flight += num_seqs
        try:
            async for item in self.channels[index].stream(request_id, submit):
                yield item
        except ReplicaLost:
            replica.up = False
            raise
        finally:
            replica.in_flight -= num_seqs

    def shutdown(self) -> None:
        """Stop polling and the replicas (their engines close, KV saves finish)."""
        self._poller.stop()
        try:
            ray.get([handle.shutdown.remote() for handle in self.handles], timeout=60)
        except Exception:  # a replica that is down has nothing to save
            logger.warning("an engine replica did not shut down cleanly", exc_info=True)
        for handle in self.handles:
            ray.kill(handle)

    def route(
        self,
        hashes: list[bytes],
        num_tokens: int,
        num_seqs: int,
        among: list[int] | None = None,
    ) -> tuple[int, int]:
        """(replica, SLO gate number): the router's choice (of `among`), or with SLO
        admission the first of it and the least loaded replica predicted to meet the SLO
        (SLOMiss if neither)."""
        try:
            choice = self.router.choose(self.replicas, hashes, among)
            fallback = self.router.least_loaded(self.replicas, among)
        except NoReplicaUp as error:
            raise Rejected(503, str(error), "overloaded", {"Retry-After": "1"}) from None
        index, seq, reason = choice.replica, 0, choice.reason
        if self.admission is not None:
            index, seq = self.admission.admit(
                self.replicas, choice, fallback, hashes, num_tokens, num_seqs
            )
            reason = reason if index == choice.replica else "slo"
        self.routed[index, reason] = self.routed.get((index, reason), 0) + 1
        return index, seq

    def reserve_decode(self, num_seqs: int) -> tuple[int, int]:
        """(decode replica, SLO gate number) for a disaggregated request: with SLO
        admission, a seat on the least loaded decode replica predicted to meet the TPOT
        (SLOMiss if none); without, the least loaded (gate number 0)."""
        up = sorted(
            (i for i in self.decode_ids if self.replicas[i].up),
            key=lambda i: self.replicas[i].in_flight,
        )
        if not up:
            raise Rejected(503, "no decode replica is up", "overloaded", {"Retry-After": "1"})
        if self.admission is None:
            return up[0], 0
        return self.admission.admit_decode(up, num_seqs)

    def release(self, index: int, seq: int) -> None:
        """An SLO admission (seq > 0) to replica `index` that will not be sent there."""
        if self.admission is not None and seq > 0:
            self.admission.release(index, seq)

    def _mark_down(self, index: int) -> None:
        self.replicas[index].up = False  # Ray restarts it; polls go on

    def _absorb(self, index: int, report: ReplicaReport) -> None:
        """A replica's poll: a new incarnation restarts its index; events and metrics."""
        replica = self.replicas[index]
        with self._lock:
            if report.incarnation != self.incarnations[index]:
                logger.warning("engine replica %d is back (restarted)", index)
                self.incarnations[index] = report.incarnation
                self._retired.retire(self._metrics[index])
                replica.blocks = set()
                if self.admission is not None:
                    self.admission.restart(index)
            replica.apply(report.events)
            self._metrics[index] = report.metrics
            if self.admission is not None:
                self.admission.publish(index, report.load)
        replica.up = True


def _unwrap(error: RayTaskError) -> Exception:
    """What the replica raised: ValueError (and the other errors the server maps) as is."""
    cause = error.cause
    if isinstance(cause, Exception) and not isinstance(cause, RayTaskError):
        return cause
    return EngineDeadError(str(error))
