"""kvserve's C++ CPU kernels, built on first use by torch's extension builder.

One kernel so far: paged decode attention (paged_attention_cpu.cpp) over float32, float16,
bfloat16 or int8 (with per-token scales) blocks. It reads each seq's K and V in place, block
by block, prefetching the next block, and sums the dot products of 16 keys (8 on AVX2)
across lanes together. On the AVX-512 test machine it attends a 64-seq float32 decode batch at about
twice the rate of inductor's fused kernel and 3.5x gather + SDPA (docs/benchmarks.md).

Each cache dtype is its own build (about 30 s on one core, once per machine and dtype), compiled
for the instruction set torch itself dispatches to (`torch.backends.cpu.get_cpu_capability()`),
into kvserve's folder of torch's extension cache (kernels/build.py: `TORCH_EXTENSIONS_DIR`,
default ~/.cache/torch_extensions; `kvserve kernels` builds them all ahead); later processes
load it in well under a second. Where it cannot be built (no C++ compiler, a
CPU that is not x86 with AVX2 or AVX-512), `decode_attention_kernel()` is None and attention
stays in torch.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from kvserve.kernels.build import load_extension
from kvserve.kv.quant import LayerKV

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

# Cache storage dtypes the kernel reads, and the name of each build.
CACHE_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int8: "int8",
}


@functools.cache
def decode_attention_kernel(
    cache_dtype: torch.dtype = torch.float32, capability: str | None = None
) -> Any | None:
    """The built extension module for caches of `cache_dtype` (`paged_decode_attention`,
    `supports`), or None where it cannot be built. `capability` (default: the one torch
    dispatches to) picks the instruction set: "AVX2" on an AVX-512 CPU tests that build."""
    name = CACHE_DTYPES.get(cache_dtype)
    if name is None:
        return None
    capability = capability or torch.backends.cpu.get_cpu_capability()
    flags = _ISA_FLAGS.get(capability)
    if flags is None:
        logger.info("C++ decode attention: no build for CPU capability %s", capability)
        return None
    start = time.perf_counter()
    try:
        module = load_extension(
            f"kvserve_paged_attention_{name}_{capability.lower()}",
            [_SOURCE],
            # OpenMP: torch's parallel_for; the macro picks the stored type
            ["-O3", "-fopenmp", f"-DKVSERVE_CACHE_{name.upper()}", *flags],
        )
    except Exception as error:  # no compiler, no ninja, a failed build: stay in torch
        logger.warning("C++ decode attention unavailable, attention stays in torch: %s", error)
        return None
    elapsed = time.perf_counter() - start
    logger.info("C++ decode attention (%s, %s) ready in %.1f s", name, capability, elapsed)
    return module


def decode_kernel_applies(
    num_heads: int, num_kv_heads: int, head_dim: int, cache_dtype: torch.dtype,
    device: torch.device, model_dtype: torch.dtype = torch.float32,
) -> bool:  # fmt: skip
    """Whether `paged_decode_attention` serves this model and cache (building it if need be):
    a float32 model, float32, float16, bfloat16 or int8 blocks on the CPU, 1 to 8 query heads
    per KV head, head_dim 1, 2, 4, 8 or 16 vectors of the CPU's width."""
    if device.type != "cpu" or model_dtype != torch.float32 or cache_dtype not in CACHE_DTYPES:
        return False
    module = decode_attention_kernel(cache_dtype)
    return module is not None and bool(module.supports(num_heads, num_kv_heads, head_dim))


def paged_decode_attention(
    q: torch.Tensor,
    layer: LayerKV,
    block_table: torch.Tensor,
    seq_lens: list[int],
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Decode attention straight from the block cache.

    Args:
        q: (n, num_heads, head_dim) float32, one query token per seq, contiguous.
        layer: one layer's cache, blocks (num_blocks, block_size, kv_heads, head_dim) in a
            dtype of CACHE_DTYPES; int8 with its (num_blocks, block_size, kv_heads) scales.
        block_table: (n, width) int64, each seq's blocks in order, contiguous.
        seq_lens: each seq's context length, this token included.
        window: sliding window in tokens (keys [seq_len - window, seq_len)), or None.
        scale: softmax scale.

    Returns:
        (n, num_heads, head_dim) float32.
    """
    module = decode_attention_kernel(layer.k.dtype)
    assert module is not None, "check decode_kernel_applies first"
    out: torch.Tensor = module.paged_decode_attention(
        q, layer.k, layer.v, layer.k_scale, layer.v_scale, block_table, seq_lens, window or 0,
        scale,
    )  # fmt: skip
    return out
