"""Which attention backend a model runner gets: chosen once, when its cache is allocated.

    --attention-backend auto  and the C++ kernel applies    -> CppDecodeBackend
    otherwise, with --compile and a cache `fused_reads`     -> FusedDecodeBackend
    otherwise                                               -> TorchSDPABackend

The kernel applies on a CPU, to a float32 model over float32, float16, bfloat16 or int8
blocks, with head shapes it was built for (`kernels.decode_kernel_applies`, which builds it on
first use). The fused kernel reads float caches always, int8 and fp8 only where inductor
vectorizes bytes (`fused_attention.fused_reads`).
"""

from __future__ import annotations

from typing import Any

import torch

from kvserve.config import ATTENTION_BACKENDS
from kvserve.kernels import decode_kernel_applies
from kvserve.model.attention.backends import (
    AttentionBackend,
    CppDecodeBackend,
    FusedDecodeBackend,
    TorchSDPABackend,
)
from kvserve.model.fused_attention import fused_reads


def select_attention_backend(
    requested: str,
    *,
    compiled: bool,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    cache_dtype: torch.dtype,
    model_dtype: torch.dtype,
    device: torch.device,
) -> AttentionBackend[Any]:
    """The backend for a runner's decode rows (prefill is SDPA in every backend).

    Args:
        requested: `--attention-backend`: "auto" (the C++ kernel where it applies) or
            "torch" (never the C++ kernel).
        compiled: whether decode steps run through torch.compile (`--compile`).
        num_heads, num_kv_heads, head_dim: the model's attention shape.
        cache_dtype: storage dtype of the K/V blocks (uint8 for int4).
        model_dtype: the model's compute dtype.
        device: where the model and cache live.

    Raises:
        ValueError: `requested` is not one of ATTENTION_BACKENDS.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend: {requested!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if requested == "auto" and decode_kernel_applies(
        num_heads, num_kv_heads, head_dim, cache_dtype, device, model_dtype=model_dtype
    ):
        return CppDecodeBackend()
    if compiled and fused_reads(cache_dtype, device):
        return FusedDecodeBackend()
    return TorchSDPABackend()
