"""`kvserve cluster`'s engine: several engine replicas (Ray actors) behind the interface the
OpenAI server already serves (`AsyncEngine`'s), so the API, streaming and limits are the same.

    HTTP request -> Serving -> ClusterEngine.generate:
        tokenize here (the router needs token ids) -> block hashes -> Router.choose
        -> replica.generate (a Ray streaming call) -> outputs yielded as they arrive
    a poller thread: every `poll_interval_s`, each replica's KV events and metrics
        -> the router's per-replica prefix index; /metrics sums the replicas

Faults: a replica that dies is restarted by Ray (`max_restarts`). Its requests that had
streamed nothing are retried on another replica; the others end with EngineDeadError (a 500
or an error event naming the replica). The router skips it until a poll answers again (a new
incarnation: its index is cleared). A consumer that goes away cancels the Ray call, which
aborts the request on the replica and frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import ray
from prometheus_client.registry import Collector
from ray.exceptions import RayActorError, RayTaskError

from kvserve.cluster.admission import ClusterAdmission
from kvserve.cluster.metrics import RetiredCounters, RoutingCollector, sum_metrics
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
    ) -> None:
        self.handles = handles
        self.router = router
        self.admission = None
        if slo is not None and any(value is not None for value in slo):
            block_size = infos[0].block_hash_params.block_size
            self.admission = ClusterAdmission(slo, len(handles), block_size)
        self.replicas = [ReplicaState() for _ in handles]
        self.incarnations = [info.incarnation for info in infos]
        self.info = infos[0]
        self.routed: dict[tuple[int, str], int] = {}  # (replica, reason) -> requests
        self._metrics: list[EngineMetrics | None] = [None] * len(handles)
        self._retired = RetiredCounters()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the poller's updates vs the event loop's reads
        self.poll_interval_s = 0.02
        self._poller = threading.Thread(target=self._poll_loop, name="kvserve-poll", daemon=True)
        self._poller.start()

    @classmethod
    def start(
        cls,
        config: EngineConfig,
        num_replicas: int,
        router: Router,
        replica_cpus: float = 1,
        slo: SLO | None = None,
    ) -> ClusterEngine:
        """Create `num_replicas` replica actors on the Ray cluster `ray.init` joined (the
        caller's) and wait until each has loaded its engine. With `slo`, requests predicted
        to miss it on every replica tried are refused (cluster/admission.py).

        Raises:
            ValueError: num_replicas or replica_cpus < 1, or an engine argument is invalid.
        """
        if num_replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {num_replicas}")
        if replica_cpus <= 0:
            raise ValueError(f"replica_cpus: must be > 0, got {replica_cpus}")
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
        return cls(handles, infos, router, slo)

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
            Rejected: 503, every replica is down.
            SLOMiss: predicted to miss the SLO on the replicas tried (429, nothing ran).
            EngineDeadError: the replica died after the request had streamed.
        """
        tokenized = await asyncio.to_thread(tokenize_prompt, self.tokenizer, prompt)
        hashes = self.info.block_hash_params.block_hashes(
            tokenized.prompt_token_ids, tokenized.cache_salt
        )
        num_tokens = len(tokenized.prompt_token_ids)
        for _ in range(len(self.handles)):  # a replica that dies before streaming: next one
            index, seq = self._route(hashes, num_tokens, params.n)
            replica = self.replicas[index]
            stream = self.handles[index].generate.remote(request_id, tokenized, params, seq)
            replica.in_flight += params.n
            streamed = finished = False
            try:
                async for ref in stream:
                    output: RequestOutput = await ref
                    streamed, finished = True, output.finished
                    yield output
                return
            except RayTaskError as error:  # the replica raised: invalid input, or a bug
                raise _unwrap(error) from None
            except RayActorError as error:
                replica.up = False
                logger.warning("engine replica %d died: %s", index, error)
                if streamed:
                    raise EngineDeadError(
                        f"engine replica {index} died while running the request"
                    ) from error
            finally:
                replica.in_flight -= params.n
                if not finished:
                    ray.cancel(stream)  # aborts it on the replica: its KV blocks are freed
        raise EngineDeadError("every engine replica tried died before answering")

    def shutdown(self) -> None:
        """Stop polling and the replicas (their engines close, KV saves finish)."""
        self._stopping.set()
        self._poller.join(timeout=5)
        try:
            ray.get([handle.shutdown.remote() for handle in self.handles], timeout=60)
        except Exception:  # a replica that is down has nothing to save
            logger.warning("an engine replica did not shut down cleanly", exc_info=True)
        for handle in self.handles:
            ray.kill(handle)

    def _route(self, hashes: list[bytes], num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """(replica, SLO gate number): the router's choice, or with SLO admission the first
        of it and the least loaded replica predicted to meet the SLO (SLOMiss if neither)."""
        try:
            choice = self.router.choose(self.replicas, hashes)
            fallback = self.router.least_loaded(self.replicas)
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

    def _poll_loop(self) -> None:
        pending: dict[int, Any] = {}  # replica -> its poll in flight
        while not self._stopping.wait(self.poll_interval_s):
            for index, handle in enumerate(self.handles):
                if index not in pending:
                    pending[index] = handle.poll.remote()
            refs = {ref: index for index, ref in pending.items()}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.poll_interval_s)
            for ref in ready:
                index = refs[ref]
                del pending[index]
                try:
                    self._absorb(index, ray.get(ref))
                except RayActorError:
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
