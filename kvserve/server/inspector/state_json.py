"""A copy of the KV cache (engine/kv_state.py) as the JSON of GET /kv/state and
GET /kv/blocks/{id}; docs/inspector.md documents every field.

Block states, by id: "null" (block 0), "free", "cached" (free, still hashed: evictable, a
later prompt may hit it), "used" (one table holds it), "shared" (more than one).
"""

from __future__ import annotations

from typing import Any

from kvserve.engine.kv_state import KVShape, KVState, RequestState
from kvserve.server.inspector.publisher import KVInspector

HASH_HEX_CHARS = 8  # enough to tell blocks apart on the page


def block_state(block_id: int, ref_cnt: int, block_hash: bytes | None) -> str:
    if block_id == 0:
        return "null"
    if ref_cnt > 1:
        return "shared"
    if ref_cnt == 1:
        return "used"
    return "free" if block_hash is None else "cached"


def state_json(
    inspector: KVInspector, state: KVState, since: float | None = None
) -> dict[str, Any]:
    """The whole of /kv/state: the pool, the requests, the cost, the series (after `since`
    when given), the tiers."""
    states = [
        block_state(i, ref, h)
        for i, (ref, h) in enumerate(zip(state.ref_counts, state.block_hashes, strict=True))
    ]
    counts = {name: states.count(name) for name in ("free", "cached", "used", "shared")}
    latest = inspector.series.latest()
    return {
        "object": "kv.state",
        "step": state.step,
        "time": state.time,
        "show_text": inspector.show_text,
        "pool": {
            "num_blocks": state.shape.num_blocks,
            "block_size": state.shape.block_size,
            "num_evictions": state.num_evictions,
            **{f"num_{name}": count for name, count in counts.items()},
            "states": states,
            "ref_counts": list(state.ref_counts),
            "hashes": [None if h is None else h.hex()[:HASH_HEX_CHARS] for h in state.block_hashes],
        },
        "requests": [_request_json(r) for r in state.requests],
        "cost": cost_json(state.shape, state.requests, counts["used"] + counts["shared"]),
        "series_origin": inspector.series.origin,
        "series": inspector.series.points(since),
        "tiers": {} if latest is None else _tiers_json(latest.kv_tiers),
    }


def _request_json(r: RequestState) -> dict[str, Any]:
    return {
        "id": r.request_id,
        "status": r.status,
        "num_prompt_tokens": r.num_prompt_tokens,
        "num_output_tokens": r.num_output_tokens,
        "num_computed_tokens": r.num_computed_tokens,
        "num_cached_tokens": max(0, r.num_cached_tokens),
        "max_tokens": r.max_tokens,
        "num_preemptions": r.num_preemptions,
        "block_ids": list(r.block_ids),
    }


def cost_json(
    shape: KVShape, requests: tuple[RequestState, ...], num_held_blocks: int
) -> dict[str, Any]:
    """The seeds' size formula on this model, and what the requests holding blocks would
    take under contiguous allocation vs what paging holds for them."""
    per_token = shape.bytes_per_token
    holding = [r for r in requests if any(r.block_ids)]
    return {
        "formula": "2 x layers x kv_heads x head_dim x bytes_per_element (+ scales)",
        "num_layers": shape.num_layers,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "kv_dtype": shape.kv_dtype,
        "bytes_per_token": per_token,
        "scale_bytes_per_token": shape.scale_bytes_per_token,
        "bytes_per_block": per_token * shape.block_size,
        "tokens_fit": (shape.num_blocks - 1) * shape.block_size,
        "pool_bytes": (shape.num_blocks - 1) * shape.block_size * per_token,
        "cache_mode": shape.cache_mode,
        "sliding_window": shape.sliding_window,
        "max_model_len": shape.max_model_len,
        "num_requests_holding": len(holding),
        # every request reserves max_model_len up front (a static cache)
        "contiguous_max_len_bytes": len(holding) * shape.max_model_len * per_token,
        # every request reserves exactly its prompt + max_tokens up front
        "contiguous_exact_bytes": sum(
            min(shape.max_model_len, r.num_prompt_tokens + r.max_tokens) for r in holding
        )
        * per_token,
        # paging without sharing: each table's blocks counted once per table
        "paged_unshared_bytes": sum(sum(1 for b in r.block_ids if b) for r in holding)
        * shape.block_size
        * per_token,
        "paged_bytes": num_held_blocks * shape.block_size * per_token,
        "tokens_held": sum(r.num_computed_tokens for r in holding),
    }


def _tiers_json(tiers: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, t in tiers.items():
        lookups = t.hits + t.misses
        out[name] = {
            "hits": t.hits,
            "misses": t.misses,
            "hit_rate": t.hits / lookups if lookups else None,
            "blocks_written": t.blocks_written,
            "bytes_written": t.bytes_written,
            "evictions": t.evictions,
            "errors": t.errors,
            "blocks_held": t.blocks_held,
            "bytes_held": t.bytes_held,
            "capacity_bytes": t.capacity_bytes,
        }
    return out


def block_json(
    inspector: KVInspector, state: KVState, block_id: int, tokenizer: Any
) -> dict[str, Any]:
    """One block: its state, ref count, hash, the requests holding it (and where), and, with
    `show_text`, the tokens it holds (K/V computed) and their text."""
    block_hash = state.block_hashes[block_id]
    ref_cnt = state.ref_counts[block_id]
    owners = [
        (r, index)
        for r in state.requests
        for index, b in enumerate(r.block_ids)
        if b == block_id and block_id != 0
    ]
    body: dict[str, Any] = {
        "object": "kv.block",
        "id": block_id,
        "state": block_state(block_id, ref_cnt, block_hash),
        "ref_count": ref_cnt,
        "hash": None if block_hash is None else block_hash.hex()[:16],
        "owners": [{"request_id": r.request_id, "index": i} for r, i in owners],
        "token_ids": None,
        "text": None,
    }
    if not inspector.show_text:
        return body
    tokens: tuple[int, ...] | None = None
    if owners:
        r, index = owners[0]
        size = state.shape.block_size
        assert r.token_ids is not None
        tokens = r.token_ids[index * size : min((index + 1) * size, r.num_computed_tokens)]
    elif block_hash is not None:
        tokens = inspector.cached_tokens.get(block_hash)
    if tokens is not None:
        body["token_ids"] = list(tokens)
        body["text"] = tokenizer.decode(list(tokens)) if tokenizer is not None else None
    return body
