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

import dataclasses
import os
import uuid
from collections.abc import AsyncGenerator
from typing import Any, NamedTuple

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.engine.prompts import TokenizedPrompt
from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_events import KVEvent
from kvserve.outputs import EngineMetrics, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.async_engine import AsyncEngine, LoadReport


class ReplicaInfo(NamedTuple):
    """What the ingress needs to route to and serve from a replica."""

    model_path: str
    tokenizer: Any
    block_hash_params: BlockHashParams
    max_model_len: int
    max_num_seqs: int
    incarnation: str
    pid: int


class ReplicaReport(NamedTuple):
    """A replica's news since the last poll."""

    incarnation: str
    events: list[KVEvent]
    metrics: EngineMetrics
    load: LoadReport  # for SLO admission in the ingress


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
            pid=os.getpid(),
        )

    async def generate(
        self, request_id: str, prompt: TokenizedPrompt, params: SamplingParams, seq: int = 0
    ) -> AsyncGenerator[RequestOutput, None]:
        """The request's cumulative outputs (`seq`: its number in the ingress's SLO gate for
        this replica); ValueError for invalid input (nothing queued)."""
        async for output in self.engine.generate(request_id, prompt, params, seq):
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
