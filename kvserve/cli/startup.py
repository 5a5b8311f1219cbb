"""The command's start time, taken before the subcommands import anything heavy, for the
"ready in X s" log line of `generate`, `chat` and `serve`."""

from __future__ import annotations

import logging
import time

STARTED = time.perf_counter()

logger = logging.getLogger("kvserve")


def log_ready(what: str) -> None:
    """Log how long the command took to get `what` ready (imports, model, KV pool, warmup)."""
    logger.info("%s ready in %.1f s", what, time.perf_counter() - STARTED)
