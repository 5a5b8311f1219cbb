"""`kvserve bench latency | throughput`: offline benchmarks, with transformers in the same process.

latency     batch-1 greedy decode of one prompt: decode tok/s, TTFT, TPOT, ITL; then the
            no-cache baseline: decode tok/s with `cache_mode="none"` against the cache, over
            several prompt lengths (O(n^2) against O(n)).
throughput  random prompts submitted at once to `LLM.generate`: request, output and total
            token throughput; transformers runs padded batches of the same prompts.

Every iteration uses fresh random prompts of the same lengths (so the prefix cache never hits),
the two systems run interleaved, and the tables report medians over iterations. The machine's
load is sampled before each iteration and any warning goes to stderr and into the JSON record.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from kvserve.bench import plots
from kvserve.bench import workloads as wl
from kvserve.bench.record import machine_info
from kvserve.config import EngineConfig
from kvserve.kv.sizing import KV_DTYPE_BYTES, kv_bytes_per_token, kv_dtype_name
from kvserve.utils.load_monitor import LoadMonitor

Record = dict[str, Any]
DecodeFn = Callable[[Sequence[int], int], tuple[wl.DecodeTiming, list[int]]]


class _Bench:
    """One run's engine, optional transformers model, prompt source and load log."""

    def __init__(self, args: argparse.Namespace, monitor: LoadMonitor) -> None:
        from kvserve.llm import LLM

        self.args, self.monitor = args, monitor
        self.config = EngineConfig.from_cli_args(args)
        self.llm = LLM(**dataclasses.asdict(self.config))
        self.hf_model: Any = None
        if args.compare_transformers:
            from kvserve.bench.hf_baseline import load_hf_model

            self.hf_model = load_hf_model(self.llm.engine.model_path)
        self.seed = args.seed if args.seed is not None else 0
        self.vocab_size, self.exclude = wl.token_space(self.llm)
        self.load_samples: list[Record] = []

    def prompts(self, lengths: Sequence[int], key: str) -> list[list[int]]:
        return wl.random_prompts(lengths, self.vocab_size, f"{key}:{self.seed}", self.exclude)

    def check_load(self, when: str) -> None:
        sample = self.monitor.wait_idle(self.args.wait_idle)
        self.load_samples.append({"when": when, **sample._asdict()})
        if sample.warning:
            message = f"WARNING: {sample.warning} (before {when}); timings may be distorted"
            print(message, file=sys.stderr)

    def record(self, benchmark: str, results: Record) -> Record:
        warnings = [s["when"] + ": " + s["warning"] for s in self.load_samples if s["warning"]]
        engine_fields = {f.name for f in dataclasses.fields(self.config)}
        bench_args = {
            key: value
            for key, value in vars(self.args).items()
            if key not in engine_fields and not key.startswith("_") and not callable(value)
        }
        return {
            "benchmark": benchmark,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {
                "bench": bench_args,
                "engine": dataclasses.asdict(self.llm.engine.config),
                "model_path": self.llm.engine.model_path,
            },
            "machine": machine_info(),
            "load": {"idle": not warnings, "warnings": warnings, "samples": self.load_samples},
            "results": results,
        }


# ---- latency ------------------------------------------------------------------------------


def run_latency(args: argparse.Namespace, monitor: LoadMonitor) -> Record:
    bench = _Bench(args, monitor)
    systems: dict[str, DecodeFn] = {"kvserve": partial(time_kvserve_decode, bench.llm)}
    if bench.hf_model is not None:
        from kvserve.bench.hf_baseline import time_hf_decode

        systems["transformers"] = partial(time_hf_decode, bench.hf_model)
    for index in range(args.warmup):
        for decode in systems.values():
            decode(bench.prompts([args.input_len], f"warmup:{index}")[0], args.output_len)
    runs: dict[str, list[tuple[wl.DecodeTiming, list[int]]]] = {name: [] for name in systems}
    for index in range(args.num_iters):
        bench.check_load(f"latency iteration {index}")
        prompt = bench.prompts([args.input_len], f"latency:{index}")[0]
        for name, decode in systems.items():
            runs[name].append(decode(prompt, args.output_len))
    results: Record = {name: wl.summarize_decode([t for t, _ in r]) for name, r in runs.items()}
    if "transformers" in results:
        ratio = results["kvserve"]["median_decode_tok_s"]
        results["ratio_decode_tok_s"] = ratio / results["transformers"]["median_decode_tok_s"]
        first_ids = [token_ids for _, token_ids in (runs["kvserve"][0], runs["transformers"][0])]
        results["greedy_tokens_agree"] = wl.agreeing_prefix(*first_ids)
    results["kv_bytes_per_token"] = measured_kv_bytes(bench.llm)
    plots.print_latency(args, results)
    lengths = [int(v) for v in args.no_cache_lens.split(",") if v.strip()]
    if lengths:
        results["no_cache"] = run_no_cache(bench, lengths)
        plots.print_no_cache(args, results["no_cache"])
        if args.plot:
            threads = plots.torch_threads()
            title = f"batch-1 decode of {args.no_cache_output_len} tokens, {threads} threads"
            plots.plot_no_cache(results["no_cache"], args.plot, title)
    return bench.record("latency", results)


def run_no_cache(bench: _Bench, lengths: list[int]) -> list[Record]:
    """Decode tok/s with and without a KV cache at each prompt length (medians)."""
    from kvserve.llm import LLM

    no_cache_llm = LLM(**dataclasses.asdict(bench.config.replace(cache_mode="none", compile=False)))
    systems: dict[str, DecodeFn] = {
        "kvserve_cache": partial(time_kvserve_decode, bench.llm),
        "kvserve_no_cache": partial(time_kvserve_decode, no_cache_llm),
    }
    if bench.hf_model is not None:
        from kvserve.bench.hf_baseline import time_hf_decode

        systems["transformers_cache"] = partial(time_hf_decode, bench.hf_model, use_cache=True)
        systems["transformers_no_cache"] = partial(time_hf_decode, bench.hf_model, use_cache=False)
    for decode in systems.values():
        decode(bench.prompts([16], "no-cache-warmup")[0], 4)
    output_len, rows = bench.args.no_cache_output_len, []
    for length in lengths:
        tok_s: dict[str, list[float]] = {name: [] for name in systems}
        for index in range(bench.args.no_cache_iters):
            bench.check_load(f"no-cache length {length} iteration {index}")
            prompt = bench.prompts([length], f"no-cache:{length}:{index}")[0]
            for name, decode in systems.items():
                tok_s[name].append(decode(prompt, output_len)[0].decode_tok_s)
        row: Record = {"prompt_len": length}
        row.update({f"{name}_tok_s": statistics.median(v) for name, v in tok_s.items()})
        for system in ("kvserve", "transformers"):
            if f"{system}_cache_tok_s" in row:
                cached, uncached = row[f"{system}_cache_tok_s"], row[f"{system}_no_cache_tok_s"]
                row[f"{system}_cache_speedup"] = cached / uncached
        rows.append(row)
    return rows


def time_kvserve_decode(
    llm: Any, prompt_ids: Sequence[int], output_len: int
) -> tuple[wl.DecodeTiming, list[int]]:
    """Stream one greedy request with `ignore_eos`; time when each token appears."""
    from kvserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    token_times: list[float] = []
    token_ids: list[int] = []
    start = time.perf_counter()
    for output in llm.generate_stream({"prompt_token_ids": list(prompt_ids)}, params):
        now = time.perf_counter()
        token_ids = output.outputs[0].token_ids
        token_times.extend([now] * (len(token_ids) - len(token_times)))
    return wl.decode_timing(start, token_times), list(token_ids)


def measured_kv_bytes(llm: Any) -> Record:
    """KV bytes per token as allocated (tensor bytes, scales included, / slots) and by the
    formula the engine sizes its pool with (`kv/sizing.py`)."""
    model_config, config = llm.engine.model_config, llm.engine.config
    caches = llm.engine.model_runner.kv_caches or []
    if not caches:
        return {"measured": 0.0, "formula": 0, "dtype_bytes": 0}
    num_slots = caches[0].k.shape[0] * caches[0].k.shape[1]  # blocks x block size
    allocated = sum(t.nbytes for layer in caches for t in layer if t is not None)
    layers, kv_heads = model_config.num_hidden_layers, model_config.num_key_value_heads
    head_dim, kv_dtype = model_config.head_dim, kv_dtype_name(config.kv_cache_dtype, config.dtype)
    formula = kv_bytes_per_token(layers, kv_heads, head_dim, kv_dtype, config.block_size)
    return {
        "measured": allocated / num_slots,
        "formula": formula.total,
        "data_bytes": formula.data,
        "scale_bytes": formula.scales,
        "kv_cache_dtype": config.kv_cache_dtype,
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "dtype_bytes": KV_DTYPE_BYTES[kv_dtype],  # int4: half a byte
    }


# ---- throughput ---------------------------------------------------------------------------


def run_throughput(args: argparse.Namespace, monitor: LoadMonitor) -> Record:
    bench = _Bench(args, monitor)
    lengths = wl.prompt_lengths(
        args.num_prompts, args.min_input_len, args.max_input_len, bench.seed
    )
    for index in range(args.warmup):
        warm = bench.prompts([min(n, 64) for n in lengths[:4]], f"warmup:{index}")
        _time_systems(bench, warm, 8, with_hf=True)
    runs: dict[str, list[Record]] = {"kvserve": [], "transformers": []}
    for index in range(args.num_iters):
        bench.check_load(f"throughput iteration {index}")
        prompts = bench.prompts(lengths, f"throughput:{index}")
        with_hf = index < args.hf_num_iters
        for name, metrics in _time_systems(bench, prompts, args.output_len, with_hf).items():
            runs[name].append(metrics)
    results: Record = {name: wl.median_runs(r) for name, r in runs.items() if r}
    if "transformers" in results:
        kv, hf = results["kvserve"], results["transformers"]
        results["ratio_output_throughput"] = kv["output_throughput"] / hf["output_throughput"]
    plots.print_throughput(args, results)
    return bench.record("throughput", results)


def _time_systems(
    bench: _Bench, prompts: list[list[int]], output_len: int, with_hf: bool
) -> dict[str, Record]:
    from kvserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    num_input = sum(len(p) for p in prompts)
    start = time.perf_counter()
    requests = [{"prompt_token_ids": p} for p in prompts]
    outputs = bench.llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    metrics = {"kvserve": wl.throughput_metrics(elapsed, len(prompts), num_input, num_output)}
    metrics["kvserve"].update(wl.request_latencies(wl.request_times(outputs)))
    if with_hf and bench.hf_model is not None:
        from kvserve.bench.hf_baseline import time_hf_batches

        hf = time_hf_batches(bench.hf_model, prompts, output_len, bench.args.hf_batch_size)
        metrics["transformers"] = wl.throughput_metrics(
            hf.elapsed_s, len(prompts), num_input, hf.num_output_tokens
        )
        metrics["transformers"]["num_padded_prompt_tokens"] = hf.num_padded_prompt_tokens
    return metrics
