"""`kvserve cluster`: the OpenAI server over several engine replicas on Ray (kvserve/cluster).
Alone it starts a local Ray; `--ray-address auto` joins one started with `ray start` (one
node or many: docs/cluster.md)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from kvserve.cli.serve import add_server_args, model_name
from kvserve.cli.startup import log_ready
from kvserve.cluster.handoff import TRANSPORTS
from kvserve.cluster.routing import ROUTERS
from kvserve.config import EngineConfig


def add_subcommand(commands: Any) -> None:
    cluster = commands.add_parser(
        "cluster", help="OpenAI-compatible HTTP server over engine replicas on Ray"
    )
    add_server_args(cluster)
    group = cluster.add_argument_group("cluster")
    group.add_argument("--replicas", type=int, default=2, help="engine replicas (Ray actors)")
    group.add_argument(
        "--router",
        choices=ROUTERS,
        default="cache-aware",
        help="cache-aware: the replica holding the longest prefix of the prompt's KV blocks, "
        "unless overloaded (then the least loaded)",
    )
    group.add_argument(
        "--overload-margin",
        type=int,
        default=4,
        help="cache-aware: skip the prefix's replica when it runs more than this many "
        "sequences beyond the least loaded one",
    )
    group.add_argument(
        "--replica-cpus",
        type=float,
        default=None,
        help="CPUs per replica, for Ray's placement and the engine's threads (default: this "
        "machine's CPUs shared out, at least 1)",
    )
    group.add_argument(
        "--prefill-replicas",
        type=int,
        default=None,
        help="prefill/decode disaggregation: this many replicas prefill (to the first token), "
        "--decode-replicas continue; replaces --replicas",
    )
    group.add_argument("--decode-replicas", type=int, default=None)
    group.add_argument(
        "--kv-transfer",
        choices=TRANSPORTS,
        default="object-store",
        help="disaggregation: hand the KV from prefill to decode through Ray's object store, "
        "or through the shared tier of --kv-remote-url",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster ('auto', or the head's HOST:PORT); default: start a "
        "local Ray and stop it on exit",
    )
    cluster.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from kvserve.cluster.cluster_engine import ClusterEngine
    from kvserve.cluster.replica import replica_config
    from kvserve.cluster.routing import Router
    from kvserve.server.launch import serve
    from kvserve.server.limits import limits_from_args

    limits = limits_from_args(args)  # a bad flag fails before Ray starts
    router = Router(args.router, args.overload_margin)
    num_replicas, num_prefill = replica_counts(args)
    cpus = args.replica_cpus or max(1, (os.cpu_count() or 1) // num_replicas)
    config = replica_config(EngineConfig.from_cli_args(args), int(max(1, cpus)))
    if args.ray_address is None:  # a local Ray sized to hold every replica
        # Ray starts its workers at nice 15; an engine replica is the work, not a background
        # task, and at nice 15 it lost the CPUs to the ingress and the clients (3.9x the TPOT
        # of `kvserve serve`, docs/benchmarks.md). The raylet reads this as it starts.
        os.environ.setdefault("RAY_worker_niceness", "0")
        local_cpus = max(os.cpu_count() or 1, int(-(-cpus * num_replicas // 1)))
        # "local": a private Ray even where `ray start` left one running (without an
        # address, ray.init would join that one).
        ray.init(
            address="local",
            num_cpus=local_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=args.ray_address, logging_level=logging.WARNING)
    try:
        cluster = ClusterEngine.start(
            config, num_replicas, router, cpus, limits.slo(), num_prefill, args.kv_transfer
        )
        log_ready(f"{num_replicas} engine replicas")
        name = args.served_model_name or model_name(cluster.model_path)
        serve(cluster, name, args.host, args.port, args.api_key, limits, args.public_metrics)
    finally:
        ray.shutdown()
    return 0


def replica_counts(args: argparse.Namespace) -> tuple[int, int]:
    """(replicas in all, prefill replicas: 0 without disaggregation)."""
    prefill, decode = args.prefill_replicas, args.decode_replicas
    if (prefill is None) != (decode is None):
        raise ValueError("prefill_replicas: give both --prefill-replicas and --decode-replicas")
    if prefill is None:
        if args.replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {args.replicas}")
        return args.replicas, 0
    if prefill < 1 or decode < 1:
        raise ValueError(f"prefill_replicas: need at least one of each, got {prefill}, {decode}")
    return prefill + decode, prefill
