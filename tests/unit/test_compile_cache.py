"""Where --compile's cache lives and what keys it (kvserve/engine/compile_cache.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from kvserve.engine.compile_cache import (
    INDUCTOR_CACHE_ENV,
    compile_cache_dir,
    frozen_graph_cache,
    use_compile_cache_dir,
    weights_key,
)


def test_cache_dir_is_under_kvserve_cache_and_names_torch_and_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    directory = Path(compile_cache_dir())
    assert directory.parent == tmp_path / "kvserve" / "compile"
    name = directory.name
    assert re.fullmatch(r"[a-z0-9._-]+", name), name  # no spaces: it ends up in g++ commands
    assert torch.__version__.replace("+", "_").lower() in name
    assert torch.backends.cpu.get_cpu_capability().lower() in name


def test_inductor_uses_kvserve_cache_unless_the_user_chose_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path / "kv"))
    monkeypatch.delenv(INDUCTOR_CACHE_ENV, raising=False)
    chosen = use_compile_cache_dir()
    assert chosen == compile_cache_dir() and Path(chosen).is_dir()
    assert Path(chosen).is_relative_to(tmp_path / "kv")
    assert os.environ[INDUCTOR_CACHE_ENV] == chosen
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))
    assert use_compile_cache_dir() == str(tmp_path / "mine")
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "mine")


def test_weights_key_changes_with_any_weight_and_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4))
    key = weights_key(model)
    assert weights_key(model) == key
    with torch.no_grad():
        model[1].bias[3] += 1e-6
    changed = weights_key(model)
    assert changed != key
    assert weights_key(model.to(torch.bfloat16)) not in (key, changed)


def test_weights_key_covers_weights_as_stored() -> None:
    from kvserve.model.quant_linear import QuantLinear, QuantTensor

    blocks = torch.zeros(4, 18, dtype=torch.uint8)  # 4 rows of one Q4_0 block
    model = QuantLinear([QuantTensor(blocks, 2, 32)], bias=None)  # non-persistent buffers
    key = weights_key(model)
    blocks[3, 17] = 1
    assert weights_key(model) != key


def test_frozen_graph_cache_tags_the_key_and_restores_onednn() -> None:
    model = nn.Linear(4, 4)
    enabled = torch.backends.mkldnn.enabled
    with frozen_graph_cache(model):
        assert not torch.backends.mkldnn.enabled  # freezing's MKL pack pass not registered
        assert torch.compiler.config.cache_key_tag == f"kvserve-weights-{weights_key(model)}"
    assert torch.backends.mkldnn.enabled == enabled
    assert torch.compiler.config.cache_key_tag == ""
