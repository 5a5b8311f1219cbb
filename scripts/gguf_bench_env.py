"""The llama.cpp side of scripts/gguf_bench.py: its own virtual environment and F32 copies.

    <repo>/.bench-envs/                      git-ignored
        llamacpp/                            venv with llama-cpp-python built from its sdist
            kvserve-built.json               version + CMAKE_ARGS, written after a good build
        gguf-f32/<stem>.<bytes>.F32.gguf     F32 copies written by llama.cpp's own quantizer

The build compiles llama.cpp (ggml CPU backend only, no BLAS, no GPU) for this CPU with
`-DGGML_NATIVE=ON`, so ggml uses every vector extension the machine has (AVX2, AVX-512,
AVX-VNNI). It takes several minutes on 2 cores and happens once: a venv whose marker matches
the pinned version and flags is reused. kvserve's own venv never imports llama_cpp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CMAKE_ARGS = "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_OPENMP=ON"
MARKER = "kvserve-built.json"
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ENVS = os.path.join(os.path.dirname(SCRIPTS), ".bench-envs")
VENV = os.path.join(ENVS, "llamacpp")
VENV_PYTHON = os.path.join(VENV, "bin", "python")
RUNNER = os.path.join(SCRIPTS, "gguf_bench_llamacpp.py")


def llamacpp_python() -> str:
    """The llama.cpp venv's python, building llama-cpp-python into it on first use."""
    marker = os.path.join(VENV, MARKER)
    wanted = {"package": LLAMA_CPP_PYTHON, "cmake_args": CMAKE_ARGS}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == wanted:
                return VENV_PYTHON
    start = time.perf_counter()
    print(f"building {LLAMA_CPP_PYTHON} into {VENV} ({CMAKE_ARGS}); takes minutes", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count()))
    pip = [VENV_PYTHON, "-m", "pip", "install", "--no-cache-dir", "--no-binary", "llama-cpp-python"]
    subprocess.run([*pip, "--verbose", LLAMA_CPP_PYTHON], check=True, env=env)
    with open(marker, "w") as f:
        json.dump(wanted, f)
    print(f"built llama-cpp-python in {time.perf_counter() - start:.0f} s", flush=True)
    return VENV_PYTHON


def f32_copy(gguf_path: str, python: str) -> str:
    """An F32 copy of `gguf_path` (every tensor dequantized), written once by llama.cpp."""
    stem = os.path.basename(gguf_path).removesuffix(".gguf")
    size = os.path.getsize(gguf_path)  # two files of one name are told apart by size
    target = os.path.join(ENVS, "gguf-f32", f"{stem}.{size}.F32.gguf")
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = target + ".partial"
        subprocess.run([python, RUNNER, "dequantize", gguf_path, partial], check=True)
        os.replace(partial, target)
    return target
