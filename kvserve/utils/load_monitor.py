"""Is anything else using the CPU while a benchmark measures? (`LoadMonitor`, /proc based.)

Timings here are noisy when another job runs (DESIGN.md section 9), so every benchmark
samples the machine's load before each iteration and records any warning with its results.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

# A busy machine: more than this many cores' worth of work from other processes.
MAX_OTHER_LOAD = 0.5


class LoadSample(NamedTuple):
    loadavg_1m: float
    own_load_1m: float  # this process's estimated share of the 1-minute load
    other_busy_cores: float | None  # other processes' CPU over the sample, in cores
    warning: str | None


def cpu_jiffies(proc_stat: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from the text of /proc/stat."""
    fields = [int(v) for v in proc_stat.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


class LoadMonitor:
    """Samples the machine's load; create it first thing, so it can tell our own load apart.

    The 1-minute load average counts our own threads too (loading a model, the previous
    iteration), so a sample warns when it exceeds `MAX_OTHER_LOAD` plus our own CPU seconds of
    the last minute / 60, or when other processes used more than `MAX_OTHER_LOAD` cores while
    we slept for the sample.
    """

    def __init__(self) -> None:
        self._history: list[tuple[float, float]] = [(time.monotonic(), time.process_time())]

    def sample(self, seconds: float = 1.0) -> LoadSample:
        before = _read_jiffies()
        own_before, wall_before = time.process_time(), time.monotonic()
        time.sleep(seconds)
        after = _read_jiffies()
        own_after, wall_after = time.process_time(), time.monotonic()
        self._history.append((wall_after, own_after))
        other = None
        if before is not None and after is not None and after[1] > before[1]:
            busy_cores = (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)
            other = max(0.0, busy_cores - (own_after - own_before) / (wall_after - wall_before))
        loadavg = os.getloadavg()[0]
        own = self._own_load(wall_after, own_after)
        return LoadSample(loadavg, own, other, _load_warning(loadavg, own, other))

    def wait_idle(self, max_wait_s: float, seconds: float = 1.0) -> LoadSample:
        """Sample until the machine looks idle or `max_wait_s` has passed; the last sample."""
        deadline = time.monotonic() + max_wait_s
        sample = self.sample(seconds)
        while sample.warning is not None and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            sample = self.sample(seconds)
        return sample

    def _own_load(self, now: float, cpu_now: float) -> float:
        """Our CPU seconds over the last minute / 60; the process is assumed to have started
        at most a minute before this monitor (so its CPU time before then counts)."""
        older = [cpu for t, cpu in self._history if t <= now - 60.0]
        return (cpu_now - (older[-1] if older else 0.0)) / 60.0


def _load_warning(loadavg: float, own: float, other: float | None) -> str | None:
    if other is not None and other > MAX_OTHER_LOAD:
        return f"machine busy: other processes used {other:.2f} cores during the load sample"
    if loadavg > MAX_OTHER_LOAD + own:
        return f"machine busy: 1-min load {loadavg:.2f} > {MAX_OTHER_LOAD} + own {own:.2f}"
    return None


def _read_jiffies() -> tuple[int, int] | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return cpu_jiffies(f.read())
    except OSError:
        return None
