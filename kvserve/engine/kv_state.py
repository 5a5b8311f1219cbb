"""The KV cache at one moment, copied for the KV inspector (server/inspector/).

`capture_kv_state` runs on the engine's thread between steps (the only thread that changes
the pool), so the copy is consistent: each block's ref count and hash, each request's block
table and token counts. It costs O(blocks + table entries); token ids are copied only when
asked (`with_tokens`: the inspector shows text only with `--kv-inspector-show-text`).

    block 0        null (never handed out; a sliding window's dropped entries point at it)
    ref_cnt 0      free; with a hash: cached, evictable, a later prompt may still hit it
    ref_cnt 1      used by one request
    ref_cnt > 1    shared (prefix hits, `n > 1` forks, beam copies)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvserve.engine.engine import Engine
from kvserve.kv.sizing import kv_bytes_per_token, kv_dtype_name


@dataclass(frozen=True)
class KVShape:
    """What the seeds' size formula needs, and the pool it sized (fixed for an engine)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    bytes_per_token: int  # K and V over all layers, quantization scales included
    scale_bytes_per_token: int
    block_size: int
    num_blocks: int  # the null block included
    max_model_len: int
    cache_mode: str
    sliding_window: int | None


@dataclass(frozen=True)
class RequestState:
    """One request of the scheduler (a sample of an `n > 1` request is `id#i`)."""

    request_id: str
    status: str  # "running", "waiting", "preempted"
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int
    num_cached_tokens: int  # prompt tokens found in the cache at admission (-1: not yet)
    max_tokens: int
    num_preemptions: int
    arrival_time: float  # time.monotonic()
    block_ids: tuple[int, ...]  # its block table; 0 where a sliding window dropped a block
    token_ids: tuple[int, ...] | None  # prompt + output, when captured `with_tokens`


@dataclass(frozen=True)
class KVState:
    """A consistent copy of the pool and the requests (see the module docstring)."""

    step: int  # engine steps run when it was taken
    time: float  # time.time()
    shape: KVShape
    ref_counts: tuple[int, ...]  # by block id
    block_hashes: tuple[bytes | None, ...]  # by block id
    requests: tuple[RequestState, ...]  # running first, in scheduling order, then the rest
    num_evictions: int


def kv_shape(engine: Engine) -> KVShape:
    """The engine's KV geometry and bytes per token (kv/sizing.py's formula)."""
    config, model = engine.config, engine.model_config
    kv_dtype = kv_dtype_name(config.kv_cache_dtype, config.dtype)
    per_token = kv_bytes_per_token(
        model.num_hidden_layers, model.num_key_value_heads, model.head_dim, kv_dtype,
        config.block_size,
    )  # fmt: skip
    return KVShape(
        num_layers=model.num_hidden_layers,
        num_kv_heads=model.num_key_value_heads,
        head_dim=model.head_dim,
        kv_dtype=kv_dtype,
        bytes_per_token=per_token.total,
        scale_bytes_per_token=per_token.scales,
        block_size=config.block_size,
        num_blocks=engine.kv_cache_manager.pool.num_blocks,
        max_model_len=engine.max_model_len,
        cache_mode=config.cache_mode,
        sliding_window=model.sliding_window if config.cache_mode == "paged" else None,
    )


def capture_kv_state(engine: Engine, shape: KVShape, step: int, with_tokens: bool) -> KVState:
    """Copy the pool and the scheduler's requests; call it on the engine's thread only."""
    manager = engine.kv_cache_manager
    blocks = manager.pool.blocks
    tables = manager.block_tables()
    scheduler = engine.scheduler
    running = [r.request_id for r in scheduler.running]
    running_ids = set(running)
    order = running + [rid for rid in scheduler.requests if rid not in running_ids]
    requests = []
    for rid in order:
        r = scheduler.requests[rid]
        requests.append(
            RequestState(
                request_id=rid,
                status=r.status.name.lower(),
                num_prompt_tokens=len(r.prompt_token_ids),
                num_output_tokens=r.num_output_tokens,
                num_computed_tokens=r.num_computed_tokens,
                num_cached_tokens=r.num_cached_tokens,
                max_tokens=r.max_tokens,
                num_preemptions=r.num_preemptions,
                arrival_time=r.arrival_time,
                block_ids=tuple(tables.get(rid, ())),
                token_ids=tuple(r.all_token_ids) if with_tokens else None,
            )
        )
    return KVState(
        step=step,
        time=time.time(),
        shape=shape,
        ref_counts=tuple(b.ref_cnt for b in blocks),
        block_hashes=tuple(b.block_hash for b in blocks),
        requests=tuple(requests),
        num_evictions=manager.pool.num_evictions,
    )
