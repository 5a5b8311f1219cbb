"""kvserve against llama.cpp on the same GGUF file, in one run (issue 18).

    PYTHONPATH=. .venv/bin/python scripts/gguf_bench.py [--gguf PATH] [--threads 2] [--iters 3]
        [--systems llamacpp-gguf,llamacpp-f32,kvserve-auto,kvserve-f32] [--out results.json]

The first run builds llama-cpp-python from source into .bench-envs/llamacpp/ (git-ignored; see
scripts/gguf_bench_env.py: ggml's CPU backend with -DGGML_NATIVE=ON, minutes on 2 cores) and
writes an F32 copy of the GGUF next to it; later runs reuse both. Each system runs in its own
process on the same seeded token-id prompts, with the same threads and context length:

- llama.cpp on the GGUF as shipped, and on the GGUF dequantized to F32;
- kvserve with `weight_format="auto"` (weights as stored; skipped while EngineConfig has no
  `weight_format` field) and `"float32"` (dequantized at load: kvserve without the field).

Workloads: batch-1 greedy decode at 128+256 and 1024+128 tokens, prefill of 512 and 2048 prompt
tokens (TTFT), each warmed up once then the median of --iters prompts; peak RSS per process. The
first 32 greedy tokens of a text prompt are checked against transformers on the same GGUF. The
weight bytes each format reads per decoded token, times the decode rate, are set against this
machine's memory bandwidth measured in the same run (the fastest of 10 sums over 1 GiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

import gguf
import gguf_bench_common as common
import gguf_bench_env as env
import gguf_bench_report as report
import torch

import kvserve
from kvserve.bench.workloads import random_prompts
from kvserve.config import EngineConfig
from kvserve.default_model import default_gguf_path

CHECK_PROMPT = "The key-value cache of a transformer stores"
CHECK_LEN = 32
# Tensor types kvserve's weight_format="auto" keeps as stored (issue 18); others become float32.
KVSERVE_KEPT_TYPES = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"})
HERE = os.path.dirname(os.path.abspath(__file__))
# The kvserve children import the kvserve this process imported (PYTHONPATH=. picks a checkout's).
KVSERVE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kvserve.__file__)))


class System(NamedTuple):
    key: str
    label: str
    runner: str  # "llamacpp" or "kvserve"
    weight_format: str  # "auto": the GGUF's tensor types as the system keeps them; "float32"


SYSTEMS = (
    System("llamacpp-gguf", "llama.cpp, GGUF as shipped", "llamacpp", "auto"),
    System("llamacpp-f32", "llama.cpp, GGUF dequantized to F32", "llamacpp", "float32"),
    System("kvserve-auto", 'kvserve weight_format="auto"', "kvserve", "auto"),
    System("kvserve-f32", 'kvserve weight_format="float32"', "kvserve", "float32"),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", default=None, help="GGUF file (default: the default model's)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every system")
    parser.add_argument("--iters", type=int, default=3, help="timed prompts per workload")
    parser.add_argument("--systems", default=",".join(s.key for s in SYSTEMS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    unknown = set(args.systems.split(",")) - {s.key for s in SYSTEMS}
    if unknown:
        parser.error(f"--systems: unknown {sorted(unknown)}")
    return args


def read_gguf(path: str) -> tuple[list[report.TensorInfo], int, frozenset[int]]:
    """The file's tensors, vocabulary size and the ids of its control tokens."""
    reader = gguf.GGUFReader(path)
    tensors = [
        report.TensorInfo(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes))
        for t in reader.tensors
    ]
    field = reader.fields["tokenizer.ggml.token_type"]
    token_types = [int(field.parts[index][0]) for index in field.data]
    control_ids = frozenset(i for i, t in enumerate(token_types) if t == gguf.TokenType.CONTROL)
    return tensors, len(token_types), control_ids


def workload_spec(vocab_size: int, exclude: frozenset[int], args: argparse.Namespace) -> list[Any]:
    """Seeded prompts of every workload: one to warm up, --iters to time; the same for all."""
    specs = []
    for workload in common.WORKLOADS:
        key = f"{workload.name}:{args.seed}"
        lengths = [workload.prompt_len] * (args.iters + 1)
        warmup_ids, *runs = random_prompts(lengths, vocab_size, key, exclude)
        specs.append({**workload._asdict(), "warmup_ids": warmup_ids, "runs": runs})
    return specs


def measure_bandwidth(threads: int) -> float:
    """Read bandwidth in bytes/s: the fastest of 10 sums over a 1 GiB float32 tensor (other
    work on the machine only slows a sum down, so the fastest is the closest to the hardware)."""
    torch.set_num_threads(threads)
    data = torch.ones(1 << 28)  # (2^28,) float32: 1 GiB
    data.sum()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.nbytes / min(times)


def run_child(python: str, script: str, mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one child process on `spec` and return the JSON it wrote."""
    with tempfile.TemporaryDirectory() as folder:
        spec_path, result_path = os.path.join(folder, "spec.json"), os.path.join(folder, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        python_path = os.pathsep.join(filter(None, [KVSERVE_ROOT, os.environ.get("PYTHONPATH")]))
        child_env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=python_path)
        command = [python, os.path.join(HERE, script), mode, spec_path, result_path]
        subprocess.run(command, check=True, env=child_env, cwd=os.path.dirname(HERE))
        with open(result_path) as f:
            result: dict[str, Any] = json.load(f)
    return result


def run_system(system: System, spec: dict[str, Any], model: str | None) -> dict[str, Any]:
    """One system's results, or `{"skipped": why}`."""
    if system.runner == "llamacpp":
        python = env.llamacpp_python()
        gguf_path = spec["gguf"]
        if system.weight_format == "float32":
            gguf_path = env.f32_copy(gguf_path, python)
        return run_child(python, "gguf_bench_llamacpp.py", "run", {**spec, "gguf": gguf_path})
    has_field = "weight_format" in {f.name for f in dataclasses.fields(EngineConfig)}
    if not has_field and system.weight_format != "float32":
        return {"skipped": "this kvserve has no weight_format yet"}
    engine_args = {"weight_format": system.weight_format} if has_field else {}
    kvserve_spec = {**spec, "model": model, "engine_args": engine_args}
    return run_child(sys.executable, "gguf_bench_kvserve.py", "kvserve", kvserve_spec)


def kept_types(system: System) -> frozenset[str] | None:
    """The tensor types `system` reads as stored (None: all); it reads the rest as float32."""
    if system.weight_format == "float32":
        return frozenset()
    return None if system.runner == "llamacpp" else KVSERVE_KEPT_TYPES


def main() -> None:
    args = parse_args()
    gguf_path = os.path.abspath(args.gguf or default_gguf_path())
    tensors, vocab_size, control_ids = read_gguf(gguf_path)
    bandwidth = measure_bandwidth(args.threads)
    spec = {"gguf": gguf_path, "threads": args.threads, "check_len": CHECK_LEN}
    reference_spec = {**spec, "check_prompt": CHECK_PROMPT}
    reference = run_child(sys.executable, "gguf_bench_kvserve.py", "transformers", reference_spec)
    spec.update(check_prompt_ids=reference["prompt_ids"])
    spec.update(workloads=workload_spec(vocab_size, control_ids, args))
    results: dict[str, Any] = {
        "gguf": gguf_path,
        "threads": args.threads,
        "iters": args.iters,
        "bandwidth_b_s": bandwidth,
        "reference": reference,
        "systems": {},
    }
    model = None if args.gguf is None else gguf_path  # None: the default model's HF cache
    for system in SYSTEMS:
        if system.key not in args.systems.split(","):
            continue
        print(f"running {system.label}", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        result = run_system(system, spec, model)
        result["load_avg_1m"] = [load_before, os.getloadavg()[0]]  # others' work skews speeds
        if "skipped" not in result:
            kept = kept_types(system)
            report.add_derived(result, tensors, kept, reference["greedy_ids"], bandwidth)
        results["systems"][system.key] = result
    labels = {system.key: system.label for system in SYSTEMS}
    print("\n".join(report.speed_table(results, labels, baseline="llamacpp-gguf")))
    print("\n" + "\n".join(report.bandwidth_table(results, labels)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
