"""`--compile`'s graphs on disk: inductor's own caches, kept where kvserve keeps its files.

Without this, every start compiled the decode buckets again (~85 s for one bucket of the
default model). Two things stood in the way:

- Inductor's caches live in `torchinductor_<user>` in the temp directory by default, which
  a reboot or a new machine empties. `use_compile_cache_dir` points them at
  `<cache>/kvserve/compile/<torch version>-<CPU>/` (`$TORCHINDUCTOR_CACHE_DIR` still wins
  when set): the FX graph cache (generated code per graph), the AOTAutograd cache, the
  autotuning choices and the built C++ kernels all live under it.
- A frozen graph (the decode buckets: weights folded in as constants, so inductor's C++ GEMM
  can prepack them) was never stored. Freezing's MKL weight-packing pass leaves oneDNN
  tensors in the graph, which the FX graph cache cannot pickle ("mkldnn tensors
  unpickleable"), so it bypassed the cache at every start. That pass is dead weight here:
  the C++ GEMM template packs the dense weight itself and prunes the MKL copy.
  `frozen_graph_cache` compiles with that pass not registered (oneDNN off while freezing
  runs; the pass is registered once per process, at the first freezing), so the graph is
  stored like any other.

What keys an entry (an entry is reused only when all of these are equal):

    torch's FX graph key   the graph (architecture, dtype, layer count), input shapes (the
                           bucket), inductor's config (INDUCTOR_CONFIG), torch's version and
                           inductor's source hash
    the directory          torch version, CPU architecture, ATen's CPU capability, inductor's
                           vector ISA: code built for AVX-512 never runs on an AVX2 machine
    cache_key_tag (ours)   the model's weights: inductor stores the prepacked weights inside
                           the entry and keys frozen parameters by shape only, so without this
                           a second model of the same shape would run the first one's weights

The attention backend and the KV cache dtype never reach these graphs: attention is the
opaque `kvserve::attention` op, which reads the step's caches at run time. Dynamo's tracing is
never cached across processes (torch keeps no such cache); it is seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import platform
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from kvserve.default_model import cache_root

logger = logging.getLogger("kvserve")

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


class CompileCacheCounts(NamedTuple):
    """Inductor's FX graph cache outcomes so far in this process (torch's counters)."""

    hits: int
    misses: int
    bypasses: int

    def since(self, before: CompileCacheCounts) -> CompileCacheCounts:
        return CompileCacheCounts(*(now - then for now, then in zip(self, before, strict=True)))


def compile_cache_counts() -> CompileCacheCounts:
    """How many compiled graphs came from the FX graph cache, were compiled and stored, or
    could not be stored, in this process so far."""
    counters = torch._dynamo.utils.counters["inductor"]
    return CompileCacheCounts(
        hits=counters["fxgraph_cache_hit"],
        misses=counters["fxgraph_cache_miss"],
        bypasses=counters["fxgraph_cache_bypass"],
    )


def compile_cache_dir() -> str:
    """`<cache>/kvserve/compile/<torch version>-<machine>-<CPU capability>-<vector ISA>`."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    try:
        isa = str(pick_vec_isa()) or "novec"  # e.g. "avx512 avx512_vnni"
    except AttributeError:  # inductor's config not fully set up in this process
        isa = "unknown"
    capability = torch.backends.cpu.get_cpu_capability()
    name = f"torch-{torch.__version__}-{platform.machine()}-{capability}-{isa}".lower()
    return os.path.join(cache_root(), "kvserve", "compile", re.sub(r"[^a-z0-9._-]", "_", name))


def use_compile_cache_dir() -> str:
    """Point inductor's on-disk caches at `compile_cache_dir()`, unless the user chose a
    directory with `$TORCHINDUCTOR_CACHE_DIR`; return the directory in use.

    Inductor reads the variable whenever it touches its cache (and sets it to its temp-directory
    default the first time), so this sets it before the first compilation.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get(INDUCTOR_CACHE_ENV)
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    directory = compile_cache_dir()
    os.makedirs(directory, exist_ok=True)
    os.environ[INDUCTOR_CACHE_ENV] = directory
    return directory


def weights_key(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (non-persistent ones too: weights as stored
    live in `QuantLinear` buffers): names, dtypes, shapes and bytes (~1 s for the default
    model's 540 MB in float32, a fifth of that as stored)."""
    digest = hashlib.sha256()
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    for name, tensor in tensors:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # (numel,)
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


@contextmanager
def frozen_graph_cache(model: nn.Module) -> Iterator[None]:
    """Compile frozen graphs of `model` inside this so that the FX graph cache stores them,
    keyed by the model's weights (see the module docstring).

    oneDNN stays off only while this is open: around the first call of each bucket, which
    compiles it. Every later step runs with the process's own setting.
    """
    compiler_config: Any = torch.compiler.config  # its `patch` is added at run time
    mkldnn_enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        with compiler_config.patch(cache_key_tag=f"kvserve-weights-{weights_key(model)}"):
            yield
    finally:
        torch._C._set_mkldnn_enabled(mkldnn_enabled)


def log_compile_cache_use(directory: str, before: CompileCacheCounts) -> None:
    """Log what the FX graph cache did since `before` (one line, after warmup)."""
    counts = compile_cache_counts().since(before)
    logger.info(
        "compile cache %s: %d graphs loaded, %d compiled and stored, %d not storable",
        directory, counts.hits, counts.misses, counts.bypasses,
    )  # fmt: skip
