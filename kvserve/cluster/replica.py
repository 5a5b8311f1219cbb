"""One engine replica: an `AsyncEngine` inside a Ray actor (kvserve/cluster/cluster_engine.py
creates them and talks to them).

    ingress (kvserve cluster)                    replica actor (its own process)
    describe()        -------------------------> tokenizer, block hash params, limits
    generate(id, tokenized prompt, params) ----> AsyncEngine.generate: outputs streamed back
    ray.cancel(stream) (client gone) ----------> CancelledError: the request is aborted,
                                                  its KV blocks freed
    poll()            -------------------------> prefix-cache events since the last poll,
                                                  metrics; `incarnation` changes on restart

Ray restarts an actor that dies (`max_restarts`): the new process runs `__init__` again, with
an empty cache and a new incarnation, which tells the ingress to forget the old index.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, NamedTuple

from kvserve.config import EngineConfig
from kvserve.engine.continuation import ContinuedSample
from kvserve.engine.engine import Engine
from kvserve.engine.prompts import TokenizedPrompt
from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_events import KVEvent
from kvserve.kv.tiers.transfer import Entry, export_entries, import_entries
from kvserve.outputs import EngineMetrics, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.async_engine import AsyncEngine
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


class EngineReplica:
    """An engine stepping on its own thread inside a Ray actor (an async actor: `generate`
    streams, and several requests are in flight at once)."""

    def __init__(self, config: EngineConfig) -> None:
        """Build the engine, prefix-cache events on."""
        self.incarnation = uuid.uuid4().hex
        self.engine = AsyncEngine.build(lambda: Engine(config, enable_kv_events=True))

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

    async def generate(
        self, request_id: str, prompt: TokenizedPrompt, params: SamplingParams, seq: int = 0
    ) -> AsyncGenerator[RequestOutput, None]:
        """The request's cumulative outputs (`seq`: its number in the ingress's SLO gate for
        this replica); ValueError for invalid input (nothing queued)."""
        async for output in self.engine.generate(request_id, prompt, params, seq):
            yield output

    async def export_kv(self, block_hashes: list[bytes], flush: bool) -> list[Entry]:
        """The prefill side of a handoff: the stored entries of the prompt's blocks (the
        object-store transport), or, with `flush`, [] once the blocks saved so far are
        written to every tier (the shared-pool transport: the decode engine reads them)."""
        engine = self.engine
        if flush:
            await asyncio.to_thread(engine.engine.flush_kv_saves, FLUSH_TIMEOUT_S)
            return []
        entries: list[Entry] = await engine.call_on_engine(
            lambda e: export_entries(e.kv_connector, block_hashes)
        )
        return entries

    async def continue_request(
        self,
        request_id: str,
        prompt: TokenizedPrompt,
        params: SamplingParams,
        samples: list[ContinuedSample],
        entries: list[Entry],
        seq: int = 0,
    ) -> AsyncGenerator[Handoff | RequestOutput, None]:
        """The decode side: take the handed-over entries into this engine's tiers, say what
        that took (a `Handoff`, first), then continue the samples (Engine.add_request)."""
        start = time.perf_counter()
        taken = await self.engine.call_on_engine(lambda e: import_entries(e.kv_connector, entries))
        num_bytes = sum(len(value) for _, value in entries)
        yield Handoff(len(entries), taken, num_bytes, time.perf_counter() - start)
        async for output in self.engine.generate(request_id, prompt, params, seq, samples):
            yield output

    def poll(self) -> ReplicaReport:
        engine = self.engine
        return ReplicaReport(
            self.incarnation, engine.take_kv_events(), engine.get_metrics(), engine.load_report
        )

    def shutdown(self) -> None:
        self.engine.shutdown()


def replica_config(config: EngineConfig, num_cpus: int) -> EngineConfig:
    """`config` with `num_threads` set to the replica's CPUs when the user left it unset."""
    if config.num_threads is not None:
        return config
    return dataclasses.replace(config, num_threads=num_cpus)
