"""`kvserve kernels`: build this machine's C++ kernels now (once per machine) and list them.

Servers and engines build a kernel the first time they need it; building ahead keeps that
(about a minute on 2 cores) out of the first start. `make test` runs it before the tests.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from kvserve.kernels import CACHE_DTYPES, decode_attention_kernel
from kvserve.kernels.quant import build_for, quant_kernel


def add_subcommand(commands: Any) -> None:
    kernels = commands.add_parser("kernels", help="build this machine's C++ kernels and list them")
    kernels.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU capability {capability}: quantized linear build {build_for(capability)}")
    builds: list[tuple[str, Any]] = [("quantized linear + layer ops", quant_kernel)]
    for dtype, name in CACHE_DTYPES.items():
        builds.append(
            (f"decode attention, {name} cache", lambda d=dtype: decode_attention_kernel(d))
        )
    for label, build in builds:
        start = time.perf_counter()
        module = build()
        state = "ready" if module is not None else "unavailable (torch's ops run instead)"
        print(f"  {label:<36} {state} ({time.perf_counter() - start:.1f} s)")
    return 0
