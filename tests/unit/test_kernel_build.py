"""A build killed mid-compile must not hang the next load (kernels/build.py).

torch's extension builder waits forever on the lock file a killed build leaves. The test kills
a real build of a one-function extension while it compiles, then loads it again, bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvserve.kernels.build import build_root, load_extension

SOURCE = """
#include <pybind11/pybind11.h>
int twice(int x) { return 2 * x; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("twice", &twice); }
"""

pytestmark = pytest.mark.slow


def test_a_build_killed_mid_compile_leaves_nothing_that_blocks_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    source = tmp_path / "twice.cpp"
    source.write_text(SOURCE)
    name = "kvserve_test_twice"
    lock = build_root() / name / "lock"
    script = (
        "from pathlib import Path; from kvserve.kernels.build import load_extension; "
        f"load_extension({name!r}, [Path({str(source)!r})], ['-O0'])"
    )
    builder = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    deadline = time.monotonic() + 120
    while not lock.exists() and builder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock.exists(), "the builder never started compiling"
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert lock.exists()  # what torch alone would wait on forever

    loaded: list[object] = []
    thread = threading.Thread(
        target=lambda: loaded.append(load_extension(name, [source], ["-O0"])), daemon=True
    )
    thread.start()
    thread.join(timeout=300)
    assert loaded, "the load after a killed build hung"
    assert loaded[0].twice(21) == 42  # type: ignore[attr-defined]
    assert not lock.exists()
