"""The op: one layer's attention over the flat batch, eager or as one opaque compiled op.

`paged_attention` writes the new tokens' K/V into the cache, then hands the decode rows and
each prefill seq to the plan's backend (backends.py). Under torch.compile the same function
runs inside the custom op `kvserve::attention`, which the graph cannot look into.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from kvserve.kv.quant import LayerKV, write_layer
from kvserve.model.attention.planning import AttentionPlan
from kvserve.model.fast_ops import layer_ops

KVCache = LayerKV  # one layer's K/V blocks (and scales when quantized), kv/quant.py


def write_kv(k: Tensor, v: Tensor, kv_cache: KVCache, slot_mapping: Tensor) -> None:
    """Store the new tokens' K/V (num_tokens, num_kv_heads, head_dim) at their slots,
    quantized to the cache's format: a float32 cache on the CPU in one C++ call."""
    ops = layer_ops(k) if kv_cache.k.dtype == torch.float32 else None
    if ops is not None and _heads_contiguous(k) and _heads_contiguous(v):
        ops.kv_write_(kv_cache.k, kv_cache.v, k, v, slot_mapping)
        return
    write_layer(kv_cache, k, v, slot_mapping)


def _heads_contiguous(x: Tensor) -> bool:
    """Whether each token's heads of x (T, heads, head_dim) are one contiguous run."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_cache: KVCache | None, plan: AttentionPlan, scale: float
) -> Tensor:
    """Attention of one layer for the whole flat batch.

    Args:
        q: (num_tokens, num_heads, head_dim) queries, RoPE applied.
        k, v: (num_tokens, num_kv_heads, head_dim) the new tokens' keys and values.
        kv_cache: this layer's cache, or None to attend among new tokens only.
        plan: from `plan_attention` for this layer's sliding window.
        scale: softmax scale, usually head_dim ** -0.5.

    Returns:
        (num_tokens, num_heads, head_dim) attention output, rows in batch order.
    """
    if kv_cache is not None:
        assert plan.slot_mapping is not None, "a cached step needs slot_mapping"
        write_kv(k, v, kv_cache, plan.slot_mapping)
    backend = plan.backend
    outputs = []
    if plan.num_decodes:
        assert kv_cache is not None, "decode seqs need a cache"
        outputs.append(
            backend.decode(q[: plan.num_decodes], kv_cache, plan.decode, scale)
        )  # (num_decodes, num_heads, head_dim)
    for seq in plan.seqs:
        rows = slice(seq.start, seq.end)
        outputs.append(
            backend.prefill(q[rows], k[rows], v[rows], kv_cache, seq, scale)
        )  # (q_len, num_heads, head_dim)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (num_tokens, heads, hd)


# ---- torch.compile: attention as one opaque op --------------------------------------------


class AttentionStep(NamedTuple):
    """One forward's per-layer plans and caches, for the opaque op below."""

    plans: list[AttentionPlan]
    kv_caches: list[KVCache] | None


_ACTIVE_STEPS: list[AttentionStep] = []


@contextmanager
def attention_step(plans: list[AttentionPlan], kv_caches: list[KVCache] | None) -> Iterator[None]:
    """Make one forward's plans and caches visible to `kvserve::attention`.

    A compiled graph must not see the step's variable-shape metadata (every new shape would
    recompile it) nor the cache tensors (functionalization may copy mutated inputs), so a
    compiled forward calls the opaque op with only (q, k, v, layer_idx, scale) and the op finds
    the rest here. Only the model runner's compiled decode enters this, around exactly one
    forward; eager forwards pass plans and caches explicitly and never read it.
    """
    _ACTIVE_STEPS.append(AttentionStep(plans, kv_caches))
    try:
        yield
    finally:
        _ACTIVE_STEPS.pop()


@torch.library.custom_op("kvserve::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, layer_idx: int, scale: float) -> Tensor:
    step = _ACTIVE_STEPS[-1]
    kv_cache = None if step.kv_caches is None else step.kv_caches[layer_idx]
    out = paged_attention(q, k, v, kv_cache, step.plans[layer_idx], scale)  # (T, heads, hd)
    return out.contiguous()


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, layer_idx: int, scale: float) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)  # (T, heads, hd)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: KVCache | None,
    plan: AttentionPlan | None,
    scale: float,
    layer_idx: int,
) -> Tensor:
    """A layer's attention: explicit plan (eager), or `plan=None` inside `attention_step`."""
    if plan is None:
        out: Tensor = _attention_op(q, k, v, layer_idx, scale)  # (T, num_heads, head_dim)
        return out
    return paged_attention(q, k, v, kv_cache, plan, scale)  # (T, num_heads, head_dim)
