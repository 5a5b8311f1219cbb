"""One engine replica: an `AsyncEngine` inside a Ray actor (kvserve/cluster/cluster_engine.py
creates them and talks to them).

    ingress (kvserve cluster)                    replica actor (its own process)
    describe()        -------------------------> tokenizer, block hash params, limits
    submit(id, tokenized prompt, params) ------> a task runs AsyncEngine.generate, its
                                                  outputs go to the outbox
    take() (one always in flight) -------------> every request's news since the last take,
                                                  outputs as deltas (wire.py): one message
                                                  a step for all requests, not one each
    abort(id) (client gone) -------------------> the task is cancelled: the request is
                                                  aborted, its KV blocks freed
    poll()            -------------------------> prefix-cache events since the last poll,
                                                  metrics; `incarnation` changes on restart

Ray restarts an actor that dies (`max_restarts`): the new process runs `__init__` again, with
an empty cache and a new incarnation, which tells the ingress to forget the old index.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from typing import Any, NamedTuple

from kvserve.cluster.wire import OutputDelta, Packer
from kvserve.config import EngineConfig
from kvserve.engine.continuation import ContinuedSample
from kvserve.engine.engine import Engine
from kvserve.engine.prompts import TokenizedPrompt
from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_events import KVEvent
from kvserve.kv.tiers.transfer import Entry, export_entries, import_entries
from kvserve.outputs import EngineMetrics, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.async_engine import AsyncEngine, EngineDeadError
from kvserve.server.engine_commands import LoadReport


class ReplicaInfo(NamedTuple):
    """What the ingress needs to route to and serve from a replica."""

    model_path: str
    tokenizer: Any
    block_hash_params: BlockHashParams
    max_model_len: int
    max_num_seqs: int
    incarnation: str


class ReplicaReport(NamedTuple):
    """A replica's news since the last poll."""

    incarnation: str
    events: list[KVEvent]
    metrics: EngineMetrics
    load: LoadReport  # for SLO admission in the ingress


class Handoff(NamedTuple):
    """What the decode engine took of a prefill's KV: entries sent and stored, bytes, and
    the seconds storing them took."""

    num_entries: int
    num_taken: int
    num_bytes: int
    import_s: float


FLUSH_TIMEOUT_S = 10.0  # a slow tier that takes longer: the decode engine recomputes

# What `take` brings of a request: a handoff's account, its output so far (as a delta), or
# the error that ended it.
Item = Handoff | OutputDelta | Exception


class Outbox:
    """A replica's news for the ingress, by request, until the next `take`. Outputs are
    cumulative, so a newer one replaces one not yet taken: a slow ingress gets fewer,
    larger updates, never a backlog."""

    def __init__(self) -> None:
        self._items: dict[str, list[Handoff | RequestOutput | Exception]] = {}
        self._packers: dict[str, Packer] = {}
        self._ready = asyncio.Event()

    def put(self, request_id: str, item: Handoff | RequestOutput | Exception) -> None:
        items = self._items.setdefault(request_id, [])
        if items and isinstance(item, RequestOutput) and isinstance(items[-1], RequestOutput):
            items[-1] = item
        else:
            items.append(item)
        self._ready.set()

    def forget(self, request_id: str) -> None:
        self._items.pop(request_id, None)
        self._packers.pop(request_id, None)

    async def take(self, wait_s: float) -> dict[str, list[Item]]:
        """Everything put since the last take (outputs packed as deltas), once there is
        something or after `wait_s`."""
        if not self._items:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait_s)
        self._ready.clear()
        items, self._items = self._items, {}
        return {request_id: self._pack(request_id, its) for request_id, its in items.items()}

    def _pack(
        self, request_id: str, items: list[Handoff | RequestOutput | Exception]
    ) -> list[Item]:
        packed: list[Item] = []
        for item in items:
            if isinstance(item, RequestOutput):
                packer = self._packers.setdefault(request_id, Packer())
                packed.append(packer.pack(item))
                if item.finished:
                    del self._packers[request_id]
            else:
                packed.append(item)
                if isinstance(item, Exception):
                    self._packers.pop(request_id, None)
        return packed


class EngineReplica:
    """An engine stepping on its own thread inside a Ray actor (an async actor: `generate`
    streams, and several requests are in flight at once)."""

    def __init__(self, config: EngineConfig) -> None:
        """Build the engine, prefix-cache events on."""
        self.incarnation = uuid.uuid4().hex
        self.engine = AsyncEngine.build(lambda: Engine(config, enable_kv_events=True))
        self.outbox = Outbox()
        self._events_ready = asyncio.Event()  # set (from the engine thread) by new KV events
        self.tasks: dict[str, asyncio.Task[None]] = {}  # requests running, to abort

    def describe(self) -> ReplicaInfo:
        engine = self.engine.engine
        return ReplicaInfo(
            model_path=engine.model_path,
            tokenizer=engine.tokenizer,
            block_hash_params=engine.block_hash_params,
            max_model_len=engine.max_model_len,
            max_num_seqs=engine.config.max_num_seqs,
            incarnation=self.incarnation,
        )

    def submit(
        self,
        request_id: str,
        prompt: TokenizedPrompt,
        params: SamplingParams,
        seq: int = 0,
        samples: list[ContinuedSample] | None = None,
        entries: list[Entry] | None = None,
    ) -> str:
        """Start a request; its outputs come through `take`, and it ends with a finished
        output or an error there (ValueError for invalid input). `seq`: its number in the
        ingress's SLO gate for this replica. With `samples`, the decode side of a handoff:
        `entries` (the prefill's KV) go into this engine's tiers first, a `Handoff` says what
        that took, then the samples continue (Engine.add_request's `continue_from`).
        Returns this replica's incarnation (the ingress notices a restart by it)."""
        run = self._run(request_id, prompt, params, seq, samples, entries)
        self.tasks[request_id] = asyncio.get_running_loop().create_task(run)
        return self.incarnation

    def abort(self, request_id: str) -> None:
        """The ingress's consumer left: abort the request, free its KV blocks."""
        task = self.tasks.pop(request_id, None)
        if task is not None:
            task.cancel()
        self.outbox.forget(request_id)

    async def take(self, wait_s: float) -> tuple[str, dict[str, list[Item]]]:
        """(incarnation, the news of each request since the last take), once there is some
        or after `wait_s` (then possibly none): the ingress keeps one take in flight."""
        return self.incarnation, await self.outbox.take(wait_s)

    async def _run(
        self,
        request_id: str,
        prompt: TokenizedPrompt,
        params: SamplingParams,
        seq: int,
        samples: list[ContinuedSample] | None,
        entries: list[Entry] | None,
    ) -> None:
        outbox = self.outbox
        try:
            if entries is not None:
                outbox.put(request_id, await self._import(entries))
            async for output in self.engine.generate(request_id, prompt, params, seq, samples):
                outbox.put(request_id, output)
        except ValueError as error:  # invalid input: sent as a plain ValueError (picklable)
            outbox.put(request_id, ValueError(str(error)))
        except Exception as error:
            outbox.put(request_id, EngineDeadError(str(error)))
        finally:
            self.tasks.pop(request_id, None)

    async def _import(self, entries: list[Entry]) -> Handoff:
        """Take a handoff's entries into this engine's tiers."""
        start = time.perf_counter()
        connector = self.engine.engine.kv_connector
        taken = await asyncio.to_thread(import_entries, connector, entries)  # as export_kv
        num_bytes = sum(len(value) for _, value in entries)
        return Handoff(len(entries), taken, num_bytes, time.perf_counter() - start)

    async def export_kv(self, block_hashes: list[bytes], flush: bool) -> list[Entry]:
        """The prefill side of a handoff: the stored entries of the prompt's blocks (the
        object-store transport), or, with `flush`, [] once the blocks saved so far are
        written to every tier (the shared-pool transport: the decode engine reads them)."""
        engine = self.engine
        if flush:
            await asyncio.to_thread(engine.engine.flush_kv_saves, FLUSH_TIMEOUT_S)
            return []
        # The tiers' stores are thread-safe (the background writer shares them), and the
        # step that computed the prompt stored its blocks before its output left: read them
        # on a thread of our own, without waiting for the engine to finish its current step.
        return await asyncio.to_thread(export_entries, engine.engine.kv_connector, block_hashes)

    async def poll(self, wait_s: float = 0.0) -> ReplicaReport:
        """Prefix-cache events since the last poll, metrics and load: at once when there
        are events, else when the engine records some or after `wait_s` (a long poll: an
        idle replica costs the ingress a call every `wait_s`, a busy one a call a step)."""
        if self.engine.on_kv_events is None:  # the first poll: on the actor's event loop
            loop = asyncio.get_running_loop()

            def wake() -> None:
                loop.call_soon_threadsafe(self._events_ready.set)

            self.engine.on_kv_events = wake
        if wait_s > 0:
            self._events_ready.clear()
            events = self.engine.take_kv_events()
            if not events:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._events_ready.wait(), wait_s)
                events = self.engine.take_kv_events()
        else:
            events = self.engine.take_kv_events()
        engine = self.engine
        return ReplicaReport(self.incarnation, events, engine.get_metrics(), engine.load_report)

    def shutdown(self) -> None:
        self.engine.shutdown()


def replica_config(config: EngineConfig, num_cpus: int) -> EngineConfig:
    """`config` with `num_threads` set to the replica's CPUs when the user left it unset."""
    if config.num_threads is not None:
        return config
    return dataclasses.replace(config, num_threads=num_cpus)
