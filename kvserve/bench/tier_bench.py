"""`kvserve bench tiers`: time to first token of a prompt whose prefix sits in one place.

The places: the block pool, the CPU tier, the disk tier, Redis, or nowhere (recompute). One
engine per place, so no other tier can serve the prefix (the pool and recompute share the
engine with no tier); all in one process and one run:

    prompt = prefix (L tokens, whole blocks) + suffix (fewer than a block, new each repeat)
    warm-up   each engine serves prefix + a warm-up suffix: computed, saved to its tier
    measure   recompute: pool reset, computes all       pool: prefix still in the pool
              cpu / disk / redis: pool reset, the prefix loaded from that tier only

Tier engines restore whatever the cost (`kv_restore="always"`), so the crossover length,
where restoring starts to beat recomputing, is measured rather than decided. Every place
reports the cached tokens of its measured requests: a tier that serves nothing (not built,
writes not landed) shows 0, never a fast recompute that looks like a hit. The repeats visit
every place in turn and the medians are kept, so a slow spell lands on all places alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import tempfile
from typing import Any

from kvserve.bench import tier_report
from kvserve.bench import workloads as wl
from kvserve.bench.offline import measured_kv_bytes
from kvserve.bench.redis_server import RedisServer
from kvserve.config import EngineConfig
from kvserve.sampling_params import SamplingParams
from kvserve.utils.load_monitor import LoadMonitor

Record = dict[str, Any]
DEFAULT_LENGTHS = "256,512,1024,2048,4096"
DEFAULT_CPU_BYTES = 1 << 30
TIER_PLACES = ("cpu", "disk", "redis")
_PARAMS = SamplingParams(temperature=0.0, max_tokens=1)


def add_subcommand(commands: Any) -> None:
    parser = commands.add_parser(
        "tiers", help="TTFT of a prefix in the pool, CPU, disk, Redis or recomputed"
    )
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="prefix tokens, comma-separated")
    parser.add_argument("--suffix-len", type=int, default=8, help="new tokens after the prefix")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per place; median")
    parser.add_argument(
        "--redis", choices=("auto",), default=None,
        help="auto: start a private redis-server for the run (or give --kv-remote-url)",
    )  # fmt: skip
    parser.add_argument("--plot", default=None, help="PNG of TTFT vs prefix length per place")
    parser.add_argument("--output-json", default=None, help="write the run's JSON record")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="max s to wait for idle")
    EngineConfig.add_cli_args(parser)


def run(args: argparse.Namespace, monitor: LoadMonitor) -> Record:
    lengths = sorted({int(v) for v in args.lengths.split(",") if v.strip()})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths: positive prefix lengths, got {args.lengths!r}")
    if args.repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {args.repeats}")
    base = bench_config(EngineConfig.from_cli_args(args), lengths[-1], args.suffix_len)
    if args.redis == "auto" and base.kv_remote_url:
        raise ValueError("--redis auto: give it or --kv-remote-url, not both")
    with contextlib.ExitStack() as stack:
        disk_dir = base.kv_disk_dir or stack.enter_context(tempfile.TemporaryDirectory())
        url = base.kv_remote_url
        if args.redis == "auto":
            url = stack.enter_context(RedisServer())
        llms = build_engines(place_configs(base, disk_dir, url))
        results = measure(llms, lengths, args, monitor)
    results["redis"] = args.redis or ("url" if base.kv_remote_url else None)
    tier_report.print_tiers(results)
    if args.plot:
        tier_report.plot_tiers(results, args.plot)
        print(f"wrote {args.plot}")
    return results


def bench_config(config: EngineConfig, max_prefix: int, suffix_len: int) -> EngineConfig:
    """`config` with room for the longest prompt: max_model_len (if not given) and a pool of
    one such request (if no pool size is given), so that each place's engine stays small.

    Raises:
        ValueError: suffix_len not in [1, block_size) (a whole block of suffix would be saved
            to the tier while timing).
    """
    if not 1 <= suffix_len < config.block_size:
        raise ValueError(f"suffix_len: must be 1 to block_size - 1, got {suffix_len}")
    if config.max_model_len is None:
        config = config.replace(max_model_len=max_prefix + config.block_size)
    if config.num_kv_blocks is None and config.kv_cache_memory_bytes is None:
        assert config.max_model_len is not None
        config = config.replace(
            num_kv_blocks=math.ceil(config.max_model_len / config.block_size) + 1
        )
    return config


def place_configs(base: EngineConfig, disk_dir: str, url: str | None) -> dict[str, EngineConfig]:
    """One config per engine: "pool" (no tier; recompute uses it too), "cpu", "disk" and
    "redis" (when `url`), each with its one tier and forced restores."""
    none = base.replace(
        kv_cpu_bytes=0, kv_disk_dir=None, kv_remote_url=None, kv_restore="always",
        preemption_mode="recompute",
    )  # fmt: skip
    configs = {
        "pool": none,
        "cpu": none.replace(kv_cpu_bytes=base.kv_cpu_bytes or DEFAULT_CPU_BYTES),
        "disk": none.replace(kv_disk_dir=disk_dir),
    }
    if url:
        configs["redis"] = none.replace(kv_remote_url=url)
    return configs


def build_engines(configs: dict[str, EngineConfig]) -> dict[str, Any]:
    from kvserve.llm import LLM

    return {name: LLM(**dataclasses.asdict(config)) for name, config in configs.items()}


def prefix_lengths(requested: list[int], max_model_len: int, block_size: int, suffix_len: int
                   ) -> list[int]:  # fmt: skip
    """The requested lengths rounded down to whole blocks, capped where prefix + suffix + one
    output token fits in `max_model_len`; sorted, without repeats or zeros."""
    longest = (max_model_len - suffix_len - 1) // block_size * block_size
    return sorted({min(n // block_size * block_size, longest) for n in requested} - {0})


def measure(llms: dict[str, Any], requested: list[int], args: argparse.Namespace,
            monitor: LoadMonitor) -> Record:  # fmt: skip
    """Every place at every length: median TTFT, cached tokens, ratio to recompute."""
    pool = llms["pool"].engine
    lengths = prefix_lengths(requested, pool.max_model_len, pool.config.block_size, args.suffix_len)
    places = ["recompute", "pool", *(p for p in TIER_PLACES if p in llms)]
    sample = monitor.wait_idle(args.wait_idle)
    if sample.warning:
        print(f"WARNING: {sample.warning}; timings may be distorted")
    rows = [measure_length(llms, places, length, args) for length in lengths]
    recompute = [row["places"]["recompute"]["ttft_ms"] for row in rows]
    served = {place: all(_served(row["places"][place]) for row in rows) for place in places}
    return {
        "lengths": lengths,
        "suffix_len": args.suffix_len,
        "repeats": args.repeats,
        "places": places,
        "rows": rows,
        "served": served,
        "crossover": {
            place: crossover(
                lengths, [_ttft_if_served(r["places"][place]) for r in rows], recompute
            )
            for place in places[2:]
        },
        "kv_bytes_per_token": measured_kv_bytes(llms["pool"])["measured"],
        "load_warning": sample.warning,
    }


def _served(cell: Record) -> bool:
    return bool(cell["cached_tokens"] >= cell["expected_cached_tokens"])


def _ttft_if_served(cell: Record) -> float:
    """The place's TTFT, inf where it missed: a miss is a recompute, not a restore."""
    return float(cell["ttft_ms"]) if _served(cell) else math.inf


def measure_length(llms: dict[str, Any], places: list[str], length: int,
                   args: argparse.Namespace) -> Record:  # fmt: skip
    vocab, exclude = wl.token_space(llms["pool"])
    prefix = wl.random_token_ids(length, vocab, f"tiers-prefix-{length}", exclude)
    warm = wl.random_token_ids(args.suffix_len, vocab, f"tiers-warm-{length}", exclude)
    for llm in llms.values():  # computes the prefix, saves it to the engine's tier
        ttft_ms(llm, prefix + warm, reset=True)
    samples: dict[str, list[tuple[float, int]]] = {place: [] for place in places}
    for repeat in range(args.repeats):
        key = f"tiers-suffix-{length}-{repeat}"
        prompt = prefix + wl.random_token_ids(args.suffix_len, vocab, key, exclude)
        for place in places:  # recompute before pool: it leaves the prefix in the pool
            llm = llms["pool" if place == "recompute" else place]
            samples[place].append(ttft_ms(llm, prompt, reset=place != "pool"))
    cells: Record = {}
    for place, values in samples.items():
        cells[place] = {
            "ttft_ms": statistics.median(ms for ms, _ in values),
            "ttft_ms_all": [ms for ms, _ in values],
            "cached_tokens": min(cached for _, cached in values),
            "expected_cached_tokens": 0 if place == "recompute" else length,
        }
    for cell in cells.values():
        cell["speedup"] = cells["recompute"]["ttft_ms"] / cell["ttft_ms"]
    return {"prefix_len": length, "prompt_len": length + args.suffix_len, "places": cells}


def ttft_ms(llm: Any, prompt: list[int], reset: bool) -> tuple[float, int]:
    """Serve `prompt` (one output token): its TTFT in ms and cached tokens. `reset` first
    empties the pool's prefix cache, so only a tier can serve the prefix.

    Raises:
        RuntimeError: the pool could not be reset (a block still in use).
    """
    if reset and not llm.reset_prefix_cache():
        raise RuntimeError("the pool's prefix cache could not be reset: a block is in use")
    (output,) = llm.generate([{"prompt_token_ids": prompt}], _PARAMS, use_tqdm=False)
    llm.flush_kv_saves()  # after the timing: the slow tiers are written in the background
    return 1000 * output.metrics.time_to_first_token, output.num_cached_tokens


def crossover(lengths: list[int], tier_ms: list[float], recompute_ms: list[float]) -> int | None:
    """The shortest measured length from which restoring stays faster than recomputing
    (None: not even at the longest)."""
    shortest = None
    for length, tier, recompute in reversed(list(zip(lengths, tier_ms, recompute_ms, strict=True))):
        if tier >= recompute:
            break
        shortest = length
    return shortest
