"""`kvserve serve`: the app of api_server.py under uvicorn, with kvserve's connection rules
(http_protocol.py), a banner saying how to call it, and a clean exit on SIGINT/SIGTERM."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from kvserve.server.api_server import build_app
from kvserve.server.engine_client import EngineClient
from kvserve.server.http_protocol import MAX_HEAD_BYTES, protocol_class
from kvserve.server.limits import ServerLimits


class Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown (exit status -15); a server that
    stopped as asked should exit 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def uvicorn_config(app: ASGIApp, host: str, port: int, limits: ServerLimits) -> uvicorn.Config:
    """uvicorn's settings for `app`: kvserve's h11 protocol (connection rules of `limits`),
    no websockets, warnings only in the log."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=protocol_class(limits),
        ws="none",
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )


def _banner(model: str, host: str, port: int, api_key: str | None, inspector: bool = False) -> str:
    """How to call the server: a curl line and a Python snippet, ready to paste; where the
    KV inspector is."""
    base = f"http://{host}:{port}/v1"
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}
    )
    key = api_key or "none"
    return (
        f"kvserve: serving {model} at {base} (Ctrl-C to stop)\n"
        f"  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
        f"  python -c 'from openai import OpenAI; "
        f'c = OpenAI(base_url="{base}", api_key="{key}"); '
        f'print(c.chat.completions.create(model="{model}", '
        f'messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)\''
    ) + (f"\n  KV inspector: http://{host}:{port}/kv" if inspector else "")


def serve(
    engine: EngineClient,
    model_name: str,
    host: str,
    port: int,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    public_metrics: bool = False,
) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn stops accepting and lets in-flight
    requests finish), then stop the engine loop."""
    limits = limits or ServerLimits()
    app = build_app(engine, model_name, api_key, limits, public_metrics)
    inspector = hasattr(engine, "inspector")
    banner = _banner(model_name, host, port, api_key, inspector)
    print(banner, file=sys.stderr, flush=True)
    config = uvicorn_config(app, host, port, limits)
    try:
        Server(config).run()
    finally:
        engine.shutdown()
