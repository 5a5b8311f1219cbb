"""Paged attention over the block cache, in three parts:

    planning.py  AttentionMetadata (the step's batch layout) -> one AttentionPlan per window
    backends.py  AttentionBackend: torch SDPA, inductor's fused kernel, kvserve's C++ kernel
    selector.py  which backend a runner gets (chosen once, from its flags, cache and device)
    op.py        paged_attention for one layer, and the opaque op torch.compile calls

The runner puts its backend in every step's `AttentionMetadata`; planning asks the backend
to plan the decode rows, and the op hands it each layer's rows. No global state picks it.
"""

from kvserve.model.attention.backends import (
    AttentionBackend,
    CppDecodeBackend,
    FusedDecodeBackend,
    TorchSDPABackend,
)
from kvserve.model.attention.op import KVCache, attention, attention_step, paged_attention
from kvserve.model.attention.planning import (
    AttentionMetadata,
    AttentionPlan,
    causal_mask,
    plan_attention,
)
from kvserve.model.attention.selector import select_attention_backend

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "AttentionPlan",
    "CppDecodeBackend",
    "FusedDecodeBackend",
    "KVCache",
    "TorchSDPABackend",
    "attention",
    "attention_step",
    "causal_mask",
    "paged_attention",
    "plan_attention",
    "select_attention_backend",
]
