"""Linear layers over GGUF weights as stored: the C++ kernel (quant_linear.cpp) and its builds.

Formats read as stored, by ggml type id: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K
(`QUANT_TYPES`). One source, three builds, chosen from the instruction set torch dispatches to
(`torch.backends.cpu.get_cpu_capability()`):

    capability    build       flags
    AVX512        avx512      -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c
    AVX2          avx2        -mavx2 -mfma -mf16c
    anything else portable    none (the compiler's baseline for the machine)

Each build takes about a minute on 2 cores, once per machine (kernels/build.py, torch's
extension cache; `kvserve kernels` builds ahead), and loads in well under a second afterwards.
Where no build is possible (no C++ compiler, a failed build) `quant_kernel()` is None and the
loader dequantizes the weights to float32 instead (kvserve/model/quant_linear.py).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from kvserve.kernels.build import load_extension

logger = logging.getLogger("kvserve")

# quant_linear.cpp (includes quant_blocks.h) and the per-layer ops of a decode step.
_SOURCES = [Path(__file__).with_name(f) for f in ("quant_linear.cpp", "layer_ops.cpp")]

# ggml type id -> name, for the formats the kernel reads (gguf.GGMLQuantizationType values).
QUANT_TYPES = {0: "F32", 1: "F16", 30: "BF16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K",
               14: "Q6_K"}  # fmt: skip

_BUILD_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "portable": [],
}  # fmt: skip

# Steps with at most this many rows run the panel path (4 weight rows at a time dequantized
# into L1, dotted with every row of x in register blocks); more rows go through 1 MB float32
# tiles and torch's GEMM. Measured per build on the model's Q4_1 matrices (AMD EPYC, 2 threads,
# docs/benchmarks.md): the AVX-512 panels (4 x 4 register blocks) beat the tiles at every row
# count from 1 to 2,048, so AVX-512 never tiles; the AVX2 panels (2 x 4) tie them at 32-64 rows
# and lose from 256.
GEMV_MAX_ROWS = {"avx512": 1 << 30, "avx2": 64, "portable": 32}


def gemv_max_rows(build: str | None = None) -> int:
    """The panel path's row limit for `build` (default: this CPU's)."""
    return GEMV_MAX_ROWS[build or build_for(torch.backends.cpu.get_cpu_capability())]


def build_for(capability: str) -> str:
    """The build a CPU capability gets: avx512, avx2 or portable."""
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "portable")


@functools.cache
def quant_kernel(build: str | None = None) -> Any | None:
    """The built extension (`quant_linear`, `dequantize`, `dequantize_rows`) for `build`
    (default: this CPU's), or None where it cannot be built."""
    build = build or build_for(torch.backends.cpu.get_cpu_capability())
    start = time.perf_counter()
    try:
        module = load_extension(
            f"kvserve_quant_linear_{build}", _SOURCES, ["-O3", "-fopenmp", *_BUILD_FLAGS[build]]
        )
    except Exception as error:  # no compiler, no ninja, a failed build: dequantize instead
        logger.warning("C++ quantized linear unavailable, weights dequantized: %s", error)
        return None
    logger.info("C++ quantized linear (%s) ready in %.1f s", build, time.perf_counter() - start)
    return module
