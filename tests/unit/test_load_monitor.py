"""The load monitor: /proc/stat arithmetic and its warnings (no model, no torch)."""

from __future__ import annotations

import pytest

from kvserve.utils import load_monitor as lm


def test_cpu_jiffies_and_load_warning() -> None:
    stat = "cpu  100 5 20 800 10 0 3 2 0 0\ncpu0 50 2 10 400 5 0 1 1 0 0\n"
    busy, total = lm.cpu_jiffies(stat)
    assert (busy, total) == (130, 940)  # idle = idle + iowait = 810
    assert lm._load_warning(0.3, 0.0, 0.1) is None
    assert lm._load_warning(1.9, 1.5, 0.1) is None  # our own load does not count
    assert "1-min load" in str(lm._load_warning(2.5, 1.0, 0.1))
    assert "other processes" in str(lm._load_warning(0.0, 0.0, 1.2))


def test_load_monitor_samples() -> None:
    sample = lm.LoadMonitor().sample(seconds=0.05)
    assert sample.loadavg_1m >= 0.0 and sample.own_load_1m >= 0.0
    assert sample.other_busy_cores is None or sample.other_busy_cores >= 0.0


def test_wait_idle_gives_up_after_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy machine and no budget: one sample, returned with its warning (no wall clock)."""
    busy = lm.LoadSample(loadavg_1m=9.0, own_load_1m=0.0, other_busy_cores=2.0, warning="busy")
    calls: list[float] = []

    def sample(self: lm.LoadMonitor, seconds: float = 1.0) -> lm.LoadSample:
        calls.append(seconds)
        return busy

    monkeypatch.setattr(lm.LoadMonitor, "sample", sample)
    assert lm.LoadMonitor().wait_idle(max_wait_s=0.0, seconds=0.01) is busy
    assert calls == [0.01]
