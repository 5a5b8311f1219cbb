"""kvserve's C++ CPU kernels, built on first use by torch's extension builder.

One kernel so far: paged decode attention over float32 blocks (paged_attention_cpu.cpp). It
reads each seq's K and V in place, block by block, prefetching the next block, and sums the
dot products of 16 keys across lanes together. On the AVX-512 test machine it attends a
64-seq decode batch at ~2x the rate of inductor's fused kernel and ~3.5x gather + SDPA
(docs/benchmarks.md).

The build (about 25 s, once) compiles for the instruction set torch itself dispatches to
(`torch.backends.cpu.get_cpu_capability()`), into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions); later processes load it in well
under a second. Where it cannot be built (no C++ compiler, a CPU that is not x86 with AVX2 or
AVX-512), `decode_attention_kernel()` is None and attention stays in torch.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("kvserve")

_SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")

# ATen's Vectorized<float> picks its implementation from these macros, as in torch's own build.
_ISA_FLAGS = {
    "AVX512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}  # fmt: skip


@functools.cache
def decode_attention_kernel() -> Any | None:
    """The built extension module (`paged_decode_attention`, `supports`), or None."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _ISA_FLAGS.get(capability)
    if flags is None:
        logger.info("C++ decode attention: no build for CPU capability %s", capability)
        return None
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    try:
        module = load(
            name=f"kvserve_paged_attention_{capability.lower()}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *flags],  # OpenMP: torch's parallel_for
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, a failed build: stay in torch
        logger.warning("C++ decode attention unavailable, attention stays in torch: %s", error)
        return None
    elapsed = time.perf_counter() - start
    logger.info("C++ decode attention (%s) ready in %.1f s", capability, elapsed)
    return module


def decode_kernel_applies(
    num_heads: int, num_kv_heads: int, head_dim: int, cache_dtype: torch.dtype,
    device: torch.device,
) -> bool:  # fmt: skip
    """Whether `paged_decode_attention` serves this model and cache (building it if need be):
    float32 blocks on the CPU, 1 to 8 query heads per KV head, head_dim a multiple of the
    vector width."""
    if device.type != "cpu" or cache_dtype != torch.float32:
        return False
    module = decode_attention_kernel()
    return module is not None and bool(module.supports(num_heads, num_kv_heads, head_dim))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: list[int],
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Decode attention straight from the block cache.

    Args:
        q: (n, num_heads, head_dim) float32, one query token per seq, contiguous.
        k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim) float32.
        block_table: (n, width) int64, each seq's blocks in order, contiguous.
        seq_lens: each seq's context length, this token included.
        window: sliding window in tokens (keys [seq_len - window, seq_len)), or None.
        scale: softmax scale.

    Returns:
        (n, num_heads, head_dim).
    """
    module = decode_attention_kernel()
    assert module is not None, "check decode_kernel_applies first"
    out: torch.Tensor = module.paged_decode_attention(
        q, k_cache, v_cache, block_table, seq_lens, window or 0, scale
    )
    return out
