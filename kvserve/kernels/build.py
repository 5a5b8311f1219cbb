"""Build and load kvserve's C++ extensions safely when several processes start at once.

torch's extension builder guards each build folder with a lock *file* and waits, forever, for
it to disappear. A process killed while compiling (a server stopped during its first start, a
test's timeout) leaves that file behind, and every later load of the extension hangs. kvserve
therefore serializes its builds with an `flock` on a file beside the build folder, which the
operating system releases when its holder dies, and, holding it, removes any lock file torch
left: whoever made that file held the flock too, so it is dead.

Builds live under `TORCH_EXTENSIONS_DIR` (default: torch's extension root), in a folder named
for the Python and torch versions, since an extension is only valid for the torch it was built
against.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("kvserve")


def build_root() -> Path:
    """The folder that holds kvserve's extension builds on this machine."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"kvserve_{version}_torch{torch.__version__.replace('+', '_')}"


def load_extension(name: str, sources: Sequence[Path], cflags: Sequence[str]) -> Any:
    """Build `sources` as the extension `name` (or reuse the build) and import it.

    Raises whatever torch's builder raises (no compiler, a failed compile)."""
    from torch.utils.cpp_extension import load

    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with build_dir.with_name(f"{name}.flock").open("a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the OS if this process dies
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("removing %s, left by a build that was killed", stale)
            stale.unlink()
        return load(
            name=name,
            sources=[str(source) for source in sources],
            extra_cflags=list(cflags),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
