"""Prefill/decode disaggregation in `kvserve cluster --prefill-replicas M --decode-replicas K`:
one request, prefilled on a prefill engine, continued on a decode engine.

    ingress                        prefill replica P                decode replica D
    route: P by prefix (router),
           D by load
    P.generate(max_tokens=1) ----> prompt computed, first token t0
    <---- t0 (streamed to the client now: its TTFT is P's)
    P.export_kv(prompt hashes) --> the prompt's stored block entries ----+  object store
    D.continue_request(samples with t0, entries ref) ------------------> | import into D's
                                                                          | tiers (Handoff),
    <---- outputs from t1 on (cumulative, t0 included) ------------------ continue sampling

Transports: "object-store" hands the entries as a Ray object from P's process to D's (each
engine keeps a CPU tier to stage them); "shared-pool" flushes P's writes to the shared Redis
tier and D reads them there (both engines need `--kv-remote-url`). Either way D's lookup
decides to load or recompute (`kv_restore`): a lost, late or corrupt entry costs compute,
never a wrong token.

Samples that end at t0 (EOS, a stop string, `max_tokens` 1) end on P; the others continue
under their own index, so seeded sampling continues as on one engine. Prompt logprobs and the
cached-token count are P's (D is asked for no prompt logprobs).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from kvserve.cluster.channel import ReplicaLost
from kvserve.cluster.replica import Handoff
from kvserve.config import EngineConfig
from kvserve.engine.continuation import ContinuedSample
from kvserve.engine.prompts import TokenizedPrompt
from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.async_engine import EngineDeadError

if TYPE_CHECKING:
    from kvserve.cluster.cluster_engine import ClusterEngine

TRANSPORTS = ("object-store", "shared-pool")
# The CPU tier each engine of a disaggregated cluster stages handed-over blocks in, when the
# engine arguments give none (object-store transport).
HANDOFF_CPU_BYTES = 256 * 2**20


@dataclasses.dataclass
class HandoffStats:
    """What the handoffs moved, for /metrics (`kvserve:kv_transfer_*`)."""

    requests: int = 0
    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0  # export on P, the object's trip and the import on D, as waited for


class Plan(NamedTuple):
    """A request's two stages: P's first token, and what D continues (None: P finished it)."""

    head: RequestOutput  # P's output, shown to the client as the first step
    samples: list[ContinuedSample] | None


def handoff_config(
    config: EngineConfig, num_prefill: int, num_replicas: int, transport: str
) -> EngineConfig:
    """The engine arguments of a disaggregated cluster's replicas (a CPU tier to stage the
    handoff in, for the object store).

    Raises:
        ValueError: no decode replica, an unknown transport, or "shared-pool" without a
            shared tier.
    """
    if not 0 < num_prefill < num_replicas:
        raise ValueError(
            f"prefill_replicas: {num_prefill} of {num_replicas} replicas leaves no decode replica"
        )
    if transport not in TRANSPORTS:
        raise ValueError(f"kv_transfer: must be one of {TRANSPORTS}, got {transport!r}")
    if transport == "shared-pool":
        if config.kv_remote_url is None:
            raise ValueError("kv_transfer: shared-pool hands KV over through --kv-remote-url")
        return config
    if config.kv_cpu_bytes == 0:
        return dataclasses.replace(config, kv_cpu_bytes=HANDOFF_CPU_BYTES)
    return config


def head_params(params: SamplingParams) -> SamplingParams:
    """What P runs: every sample to its first token (`min_tokens` capped to that one token:
    EOS is still held back from it when the request asked for any)."""
    return params.replace(max_tokens=1, min_tokens=min(params.min_tokens, 1))


def plan(first: RequestOutput, params: SamplingParams) -> Plan:
    """Which samples continue on D (those P stopped only for the one-token cap)."""
    assert params.max_tokens is not None
    if params.max_tokens <= 1:
        return Plan(first, None)
    samples = [
        ContinuedSample(o.index, o.token_ids, o.logprobs, o.cumulative_logprob or 0.0)
        for o in first.outputs
        if o.finish_reason == "length" and len(o.token_ids) == 1
    ]
    if not samples:
        return Plan(first, None)
    continuing = {sample.index for sample in samples}
    outputs = [
        dataclasses.replace(o, finish_reason=None, stop_reason=None) if o.index in continuing else o
        for o in first.outputs
    ]
    return Plan(dataclasses.replace(first, outputs=outputs, finished=False), samples)


def merge(head: RequestOutput, later: RequestOutput) -> RequestOutput:
    """D's output, with the samples that ended on P and P's prompt-side fields."""
    continued = {o.index for o in later.outputs}
    ended = [o for o in head.outputs if o.index not in continued]
    outputs: list[CompletionOutput] = sorted([*later.outputs, *ended], key=lambda o: o.index)
    return dataclasses.replace(
        later,
        request_id=head.request_id,
        outputs=outputs,
        prompt_logprobs=head.prompt_logprobs,
        num_cached_tokens=head.num_cached_tokens,
        num_cached_tokens_by_tier=head.num_cached_tokens_by_tier,
    )


async def decode_outputs(
    items: AsyncGenerator[Any, None], head: RequestOutput, stats: HandoffStats, start: float
) -> AsyncGenerator[RequestOutput, None]:
    """D's stream (a `Handoff`, then outputs) as the client's outputs, the handoff counted
    in `stats` (its seconds: from the export's start to the import's end)."""
    async for item in items:
        if isinstance(item, Handoff):
            stats.requests += 1
            stats.blocks += item.num_taken
            stats.bytes += item.num_bytes
            stats.seconds += time.perf_counter() - start
            continue
        yield merge(head, item)


async def disaggregated(
    cluster: ClusterEngine,
    request_id: str,
    tokenized: TokenizedPrompt,
    hashes: list[bytes],
    params: SamplingParams,
) -> AsyncGenerator[RequestOutput, None]:
    """Prefill (to the first token) on a prefill replica, then continue on a decode
    replica with the KV handed over (the module docstring). With SLO admission the decode
    seat is reserved first (cluster/admission.py): a miss at either stage is a 429 before
    any prefill."""
    assert params.max_tokens is not None
    needs_seat = cluster.admission is not None and params.max_tokens > 1
    reservation = cluster.reserve_decode(params.n) if needs_seat else None
    handed_over = False
    try:
        first, index = await _prefill(cluster, request_id, tokenized, hashes, params)
        stages = plan(first, params)
        yield stages.head
        if stages.samples is None:
            return
        decode, seq = reservation or cluster.reserve_decode(len(stages.samples))
        start = time.perf_counter()
        export = cluster.handles[index].export_kv.remote(hashes, cluster.transport == "shared-pool")
        submit = partial(
            cluster.handles[decode].submit.remote,
            request_id, tokenized, params.replace(prompt_logprobs=None), seq, stages.samples,
            export,
        )  # fmt: skip
        handed_over = True
        try:
            items = cluster.stream(decode, request_id, len(stages.samples), submit)
            async for output in decode_outputs(items, stages.head, cluster.handoffs, start):
                yield output
        except ReplicaLost as error:
            raise EngineDeadError(f"decode replica {decode} died mid-request") from error
    finally:
        if reservation is not None and not handed_over:
            cluster.release(*reservation)


async def _prefill(
    cluster: ClusterEngine,
    request_id: str,
    tokenized: TokenizedPrompt,
    hashes: list[bytes],
    params: SamplingParams,
) -> tuple[RequestOutput, int]:
    """(the output with every sample's first token, the prefill replica that made it),
    from the first prefill replica that does not die first."""
    for _ in range(len(cluster.prefill_ids)):
        index, seq = cluster.route(
            hashes, len(tokenized.prompt_token_ids), params.n, cluster.prefill_ids
        )
        submit = partial(
            cluster.handles[index].submit.remote,
            request_id, tokenized, head_params(params), seq,
        )  # fmt: skip
        first = None
        try:
            async for output in cluster.stream(index, request_id, params.n, submit):
                first = output  # the last: every sample has its first token
        except ReplicaLost:
            continue
        assert first is not None
        return first, index
    raise EngineDeadError("every prefill replica tried died before answering")
