"""`kvserve serve`: the OpenAI-compatible HTTP server over one engine."""

from __future__ import annotations

import argparse
import os
from typing import Any

from kvserve.cli.startup import log_ready
from kvserve.config import EngineConfig
from kvserve.server.limits import add_limit_args


def add_subcommand(commands: Any) -> None:
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_server_args(serve)
    serve.add_argument(
        "--kv-inspector-show-text",
        action="store_true",
        help="the KV inspector page (/kv) shows the tokens each block holds, as text "
        "(off: prompts may be private)",
    )
    serve.set_defaults(func=run)


def add_server_args(serve: argparse.ArgumentParser) -> None:
    """The HTTP server's flags, its limits and the engine's (`serve` and `cluster` share them)."""
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="default: the model's name")
    serve.add_argument(
        "--api-key", default=None, help="every path but /health needs 'Authorization: Bearer KEY'"
    )
    serve.add_argument(
        "--public-metrics", action="store_true", help="/metrics without the API key (scrapers)"
    )
    add_limit_args(serve)
    EngineConfig.add_cli_args(serve)


def run(args: argparse.Namespace) -> int:
    from kvserve.engine.engine import Engine
    from kvserve.server.async_engine import AsyncEngine
    from kvserve.server.launch import serve
    from kvserve.server.limits import limits_from_args

    limits = limits_from_args(args)  # before loading the model: a bad flag fails fast
    config = EngineConfig.from_cli_args(args)
    async_engine = AsyncEngine.build(lambda: Engine(config), limits.slo())  # built where it steps
    async_engine.inspector.show_text = args.kv_inspector_show_text
    log_ready("engine")
    name = args.served_model_name or model_name(async_engine.engine.model_path)
    serve(async_engine, name, args.host, args.port, args.api_key, limits, args.public_metrics)
    return 0


def model_name(model_path: str) -> str:
    """A folder's or file's name, without `.gguf` (the default model: SmolLM2-135M-Instruct)."""
    base = os.path.basename(os.path.normpath(model_path))
    name = base.removesuffix(".gguf")
    return name.rsplit("-Q", 1)[0] if "SmolLM2" in name else name
