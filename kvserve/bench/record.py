"""A benchmark run's JSON record: the machine it ran on, written as strict JSON."""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Any

Record = dict[str, Any]


def machine_info() -> Record:
    """CPU model and count, torch threads and the versions that shape the timings."""
    import torch
    import transformers

    model_names = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model_names = [line.split(":", 1)[1].strip() for line in f if "model name" in line]
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model_names[0] if model_names else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


def write_record(record: Record, path: str) -> None:
    """Write `record` as indented JSON, inf and nan as strings (strict JSON has neither)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(record), f, indent=2)
        f.write("\n")


def _finite(value: Any) -> Any:
    """`value` with inf and nan floats written as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
