"""`kvserve bench trace-tiers`: a Mooncake trace replayed on the engine with the pool alone,
then + CPU, + disk (+ Redis), next to what the simulator (`kvserve trace simulate`) predicts
for the same pool blocks and tier sizes.

Scaling, to fit a 2-core CPU:
- conversations are thinned: a request is kept when its second hash id (the first block after
  the system prompt every request shares: it names the conversation) is a multiple of
  `--sample-conversations`, so every turn of a kept conversation is kept and its reuse too;
- lengths are scaled as `bench serve` scales them (`--length-scale`, 512 -> 16 tokens: one
  trace block is one engine block), and a request longer than max_model_len is dropped.

The replay is sequential: in arrival order, each request runs alone to its last token before
the next starts, so TTFT is service time (lookup, loads, prefill), without queueing. The
simulator gets the same requests spaced so that none overlaps, the engine's usable pool
blocks, tier capacities of (tier bytes / bytes of one entry) blocks, and a prefill rate
calibrated on the pool-only run. Tiers are cumulative, each configuration adding one:

    pool          pool
    cpu           pool + cpu (--cpu-blocks)
    disk          pool + cpu + disk (--disk-blocks)
    redis         pool + cpu + disk + redis (--redis-blocks; --kv-remote-url or --redis auto)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from kvserve.bench import tier_report
from kvserve.bench import workloads as wl
from kvserve.bench.redis_server import RedisServer
from kvserve.bench.serve_workload import TokenSpace, TraceReplay
from kvserve.config import EngineConfig
from kvserve.sampling_params import SamplingParams
from kvserve.sim.replay import simulate
from kvserve.sim.results import CostModel
from kvserve.sim.tiers import TierSpec
from kvserve.trace.records import TRACE_BLOCK_TOKENS, TraceReader, TraceRecord
from kvserve.utils.load_monitor import LoadMonitor

Record = dict[str, Any]
TIERS = ("cpu", "disk", "redis")  # the order they chain in, below the pool
_SPACED_MS = 1e12  # between two requests in the simulator: none overlaps


def add_subcommand(commands: Any) -> None:
    parser = commands.add_parser(
        "trace-tiers", help="a trace on the engine with the pool, + CPU, + disk, + Redis vs sim"
    )
    parser.add_argument("trace", help="a Mooncake .jsonl trace")
    parser.add_argument("--sample-conversations", type=int, default=60,
                        help="keep one conversation in N (whole conversations)")  # fmt: skip
    parser.add_argument("--max-requests", type=int, default=None, help="the first N kept")
    parser.add_argument("--length-scale", type=float, default=1 / 32)
    parser.add_argument("--cpu-blocks", type=int, default=256, help="CPU tier size in blocks")
    parser.add_argument("--disk-blocks", type=int, default=2048, help="disk tier size in blocks")
    parser.add_argument("--redis-blocks", type=int, default=4096, help="Redis size (simulator)")
    parser.add_argument("--tier-gb-s", default="cpu:5,disk:1,redis:0.5",
                        help="restore bandwidth per tier, for the simulator")  # fmt: skip
    parser.add_argument("--redis", choices=("auto",), default=None,
                        help="auto: start a private redis-server (or --kv-remote-url, an empty "
                        "database)")  # fmt: skip
    parser.add_argument("--skip-bad-lines", action="store_true")
    parser.add_argument("--output-json", default=None, help="write the run's JSON record")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="max s to wait for idle")
    EngineConfig.add_cli_args(parser)
    parser.set_defaults(num_kv_blocks=160, max_model_len=2048)


def sample_conversations(records: Iterable[TraceRecord], every: int) -> Iterator[TraceRecord]:
    """The requests of one conversation in `every` (by the second hash id; a request with
    only one block names no conversation and is left out unless `every` is 1).

    Raises:
        ValueError: `every` < 1 (names --sample-conversations).
    """
    if every < 1:
        raise ValueError(f"--sample-conversations: must be >= 1, got {every}")
    for record in records:
        if every == 1 or (len(record.hash_ids) > 1 and record.hash_ids[1] % every == 0):
            yield record


def run(args: argparse.Namespace, monitor: LoadMonitor) -> Record:
    base = EngineConfig.from_cli_args(args).replace(
        kv_cpu_bytes=0, kv_disk_dir=None, kv_remote_url=None
    )
    url = EngineConfig.from_cli_args(args).kv_remote_url
    if args.redis == "auto" and url:
        raise ValueError("--redis auto: give it or --kv-remote-url, not both")
    gb_s = parse_gb_s(args.tier_gb_s)
    with contextlib.ExitStack() as stack:
        if args.redis == "auto":
            url = stack.enter_context(RedisServer())
        names = ["pool", "cpu", "disk", *(["redis"] if url else [])]
        workload, rows = replay_configs(names, base, args, url, monitor)
    calibrated = rows[0]["engine"]["prefill_tokens_per_s"]
    for row in rows:
        row["sim"] = predict(workload, tier_specs(row["config"], args, gb_s), calibrated)
    results = {"workload": workload.summary(), "prefill_tokens_per_s": calibrated, "rows": rows}
    tier_report.print_trace_tiers(results)
    return results


def replay_configs(
    names: list[str], base: EngineConfig, args: argparse.Namespace, url: str | None,
    monitor: LoadMonitor,
) -> tuple[Workload, list[Record]]:  # fmt: skip
    """Replay the workload on one engine per configuration, one after the other (the
    pool-only engine first: it reads the workload and measures the entry size)."""
    workload: Workload | None = None
    rows: list[Record] = []
    for name in names:
        with tempfile.TemporaryDirectory() as disk_dir:
            llm = build_engine(base, name, args, disk_dir, url, workload)
            workload = workload or read_workload(llm, args)
            sample = monitor.wait_idle(args.wait_idle)
            engine = replay(llm, workload)
            engine["load_warning"] = sample.warning
            rows.append({"config": name, "engine": engine})
            del llm  # its pool and CPU tier, before the next engine allocates its own
    assert workload is not None
    return workload, rows


@dataclasses.dataclass
class Workload:
    """The kept trace records, their scaled prompts and output lengths, and the sizes."""

    records: list[TraceRecord]
    prompts: list[list[int]]
    output_lens: list[int]
    block_tokens: int  # engine tokens per trace block
    pool_blocks: int  # the engine's usable pool blocks
    entry_bytes: int  # bytes of one block in a tier
    num_too_long: int

    def summary(self) -> Record:
        return {
            "num_requests": len(self.records),
            "num_too_long": self.num_too_long,
            "mean_prompt_tokens": statistics.fmean(len(p) for p in self.prompts),
            "mean_output_tokens": statistics.fmean(self.output_lens),
            "block_tokens": self.block_tokens,
            "pool_blocks": self.pool_blocks,
            "entry_bytes": self.entry_bytes,
        }


def build_engine(base: EngineConfig, name: str, args: argparse.Namespace, disk_dir: str,
                 url: str | None, workload: Workload | None) -> Any:  # fmt: skip
    """The engine of configuration `name`: the tiers up to it, sized in blocks of
    `workload.entry_bytes` (the pool-only engine comes first and measures that)."""
    from kvserve.llm import LLM

    config = base
    if name != "pool":
        assert workload is not None
        entry = workload.entry_bytes
        config = config.replace(kv_cpu_bytes=args.cpu_blocks * entry)
        if name in ("disk", "redis"):
            config = config.replace(kv_disk_dir=disk_dir, kv_disk_bytes=args.disk_blocks * entry)
        if name == "redis":
            config = config.replace(kv_remote_url=url)
    return LLM(**dataclasses.asdict(config))


def read_workload(llm: Any, args: argparse.Namespace) -> Workload:
    from kvserve.kv.kv_cache import read_block
    from kvserve.kv.tiers.serde import encode_block

    engine = llm.engine
    vocab, exclude = wl.token_space(llm)
    scaler = TraceReplay(TokenSpace(vocab, exclude), length_scale=args.length_scale)
    reader = TraceReader(args.trace, skip_bad_lines=args.skip_bad_lines)
    records: list[TraceRecord] = []
    prompts: list[list[int]] = []
    output_lens: list[int] = []
    too_long = 0
    for record in sample_conversations(reader, args.sample_conversations):
        if args.max_requests is not None and len(records) >= args.max_requests:
            break
        num_tokens, num_output = scaler.scaled_lengths(record)
        if num_tokens + num_output > engine.max_model_len:
            too_long += 1
            continue
        records.append(record)
        prompts.append(scaler.prompt(record))
        output_lens.append(num_output)
    if not records:
        raise ValueError(f"trace: no request of {args.trace} kept (sampling, max_model_len)")
    block = read_block(engine.model_runner.kv_caches, 0)
    entry_bytes = len(encode_block(block, bytes(32), engine.block_hash_params))
    pool_blocks = engine.kv_cache_manager.num_usable_blocks
    return Workload(records, prompts, output_lens, scaler.block_tokens, pool_blocks,
                    entry_bytes, too_long)  # fmt: skip


def replay(llm: Any, workload: Workload) -> Record:
    """Each request alone, in order: hit ratio, TTFT, blocks each tier served."""
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate([{"prompt_token_ids": workload.prompts[0][:4]}], warm, use_tqdm=False)
    llm.reset_prefix_cache()  # first calls pay one-time costs
    ttfts, cached = [], []
    for prompt, num_output in zip(workload.prompts, workload.output_lens, strict=True):
        params = SamplingParams(temperature=0.0, max_tokens=num_output, ignore_eos=True)
        (output,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        llm.flush_kv_saves()  # the next request finds every block written (reproducible)
        ttfts.append(1000 * output.metrics.time_to_first_token)
        cached.append(output.num_cached_tokens)
    prompt_tokens = sum(len(p) for p in workload.prompts)
    computed = prompt_tokens - sum(cached)
    return {
        "num_requests": len(ttfts),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": sum(cached),
        "token_hit_ratio": sum(cached) / prompt_tokens,
        "mean_ttft_ms": statistics.fmean(ttfts),
        "p99_ttft_ms": wl.percentile(ttfts, 99),
        "prefill_tokens_per_s": 1000 * computed / sum(ttfts),
        "tier_hit_blocks": tier_hit_blocks(llm),
    }


def tier_hit_blocks(llm: Any) -> dict[str, int]:
    """Blocks each tier handed back (its hits), {} without tiers."""
    return {name: tier.hits for name, tier in llm.get_metrics().kv_tiers.items()}


def tier_specs(name: str, args: argparse.Namespace, gb_s: dict[str, float]) -> list[TierSpec]:
    """The simulator's lower tiers of configuration `name` (cumulative, in chain order)."""
    sizes = {"cpu": args.cpu_blocks, "disk": args.disk_blocks, "redis": args.redis_blocks}
    upto = 0 if name == "pool" else TIERS.index(name) + 1
    return [TierSpec(tier, sizes[tier], gb_s[tier]) for tier in TIERS[:upto]]


def predict(workload: Workload, tiers: list[TierSpec], tokens_per_s: float) -> Record:
    """What the simulator predicts for the same requests, one after the other."""
    spaced = [r._replace(timestamp_ms=i * _SPACED_MS) for i, r in enumerate(workload.records)]
    scale = workload.block_tokens / TRACE_BLOCK_TOKENS  # engine tokens per trace token
    kv_bytes_per_token = max(1, round(workload.entry_bytes / TRACE_BLOCK_TOKENS))
    cost = CostModel(tokens_per_s / scale, 0.0, kv_bytes_per_token)
    (result,) = simulate(lambda: iter(spaced), [workload.pool_blocks], ["lru"], cost, tiers)
    left_s = result["prefill_s_without_cache"] - result["prefill_s_saved"]
    return {
        "token_hit_ratio": result["prefill_tokens_saved"] / result["prompt_tokens"],
        "pool_token_hit_ratio": result["token_hit_ratio"],
        "tier_hit_blocks": {name: t["hit_blocks"] for name, t in result["tiers"].items()},
        "mean_prefill_ms": 1000 * left_s / result["num_requests"],
        "num_rejected": result["num_rejected"],
        "tiers": [t._asdict() for t in tiers],
    }


def parse_gb_s(text: str) -> dict[str, float]:
    """ "cpu:5,disk:1,redis:0.5" -> {"cpu": 5.0, ...}; every tier needs one.

    Raises:
        ValueError: a malformed entry, a value <= 0 or a tier missing (names --tier-gb-s).
    """
    values: dict[str, float] = {}
    for entry in text.split(","):
        name, _, value = entry.strip().partition(":")
        try:
            values[name] = float(value)
        except ValueError:
            raise ValueError(f"--tier-gb-s: each entry is tier:GB_per_s, got {entry!r}") from None
        if not values[name] > 0:
            raise ValueError(f"--tier-gb-s: bandwidth must be > 0, got {entry!r}")
    missing = [tier for tier in TIERS if tier not in values]
    if missing:
        raise ValueError(f"--tier-gb-s: no bandwidth for {', '.join(missing)}")
    return values
