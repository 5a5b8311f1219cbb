"""`kvserve` command line: generate | chat | serve | kv-size | eval | trace | bench.

    main.py      the parser and `main` (the console script `kvserve`, `python -m kvserve`)
    generate.py  generate and chat: sampling flags, text streamed to stdout
    serve.py     the OpenAI-compatible server
    kv_size.py   the KV cache size and capacity planner
    startup.py   the command's start time, for the "ready in X s" log line

Engine flags come from `EngineConfig.add_cli_args`; eval, trace and bench bring their own
subcommands (kvserve/eval, kvserve/trace, kvserve/sim, kvserve/bench).
"""

from kvserve.cli import startup  # noqa: F401  (first: it notes the start time)
from kvserve.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
