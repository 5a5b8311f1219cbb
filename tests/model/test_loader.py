"""The loader is strict: every tensor of the checkpoint lands somewhere, every parameter is
filled, and each failure names what went wrong."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvserve.model.attention import AttentionMetadata
from kvserve.model.layers import CausalLM
from kvserve.model.loader import load_model
from kvserve.model.registry import MODEL_CLASSES, get_model_class


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, edit) -> None:
    """Rewrite the single model.safetensors of `folder` through `edit(state_dict)`."""
    file = folder / "model.safetensors"
    state_dict = load_file(file)
    edit(state_dict)
    save_file(state_dict, file)


@torch.inference_mode()
def _logits(model: CausalLM, n: int = 6) -> torch.Tensor:
    md = AttentionMetadata([0, n], [n], 0, None, None, 4)
    ids = torch.arange(n) * 7 % model.config.vocab_size
    return model.compute_logits(model(ids, torch.arange(n), md, None))  # (n, vocab)


def test_missing_tensor_is_named(tiny_checkpoints: dict, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoints["llama"], tmp_path)
    _edit_weights(folder, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(folder)


def test_unexpected_tensor_is_named(tiny_checkpoints: dict, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoints["llama"], tmp_path)
    _edit_weights(folder, lambda sd: sd.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.extra\.weight'"):
        load_model(folder)


def test_shape_mismatch_is_named(tiny_checkpoints: dict, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoints["qwen2"], tmp_path)
    key = "model.layers.0.self_attn.v_proj.bias"
    _edit_weights(folder, lambda sd: sd.update({key: torch.zeros(7)}))
    with pytest.raises(ValueError, match=rf"{key}.*\(7,\).*expects \(32,\)"):
        load_model(folder)


def test_gpt2_shape_mismatch_reports_checkpoint_orientation(
    tiny_checkpoints: dict, tmp_path: Path
) -> None:
    folder = _copy(tiny_checkpoints["gpt2"], tmp_path)
    key = "transformer.h.0.mlp.c_fc.weight"  # Conv1D: (in, out) = (64, 256)
    _edit_weights(folder, lambda sd: sd.update({key: torch.zeros(256, 64)}))
    with pytest.raises(ValueError, match=r"\(256, 64\).*expects \(64, 256\)"):
        load_model(folder)


def test_unknown_architecture_lists_supported(tiny_checkpoints: dict, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoints["llama"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'FalconForCausalLM'.*GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(folder)
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        get_model_class("FalconForCausalLM")


def test_missing_files(tiny_checkpoints: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such"):
        load_model(tmp_path / "nowhere")
    folder = _copy(tiny_checkpoints["llama"], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(folder)


def test_missing_shard_is_named(tiny_checkpoints: dict, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoints["llama_mqa"], tmp_path)  # sharded, with an index
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(folder)


def test_table_exceptions_load_and_change_nothing(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """GPT-2 saved from GPT2Model (no "transformer." prefix, attn.bias buffers) and a tied
    checkpoint that still stores lm_head.weight both load to the same model."""
    reference = _logits(load_model(tiny_checkpoints["gpt2"]))
    folder = _copy(tiny_checkpoints["gpt2"], tmp_path)

    def to_base_model_format(sd: dict) -> None:
        for key in list(sd):
            sd[key.removeprefix("transformer.")] = sd.pop(key)
        sd["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
        sd["lm_head.weight"] = sd["wte.weight"].clone()

    _edit_weights(folder, to_base_model_format)
    torch.testing.assert_close(_logits(load_model(folder)), reference, rtol=0, atol=0)


def test_dtype_and_parameters(tiny_checkpoints: dict) -> None:
    model = load_model(tiny_checkpoints["qwen2"], dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params.values())
    assert "lm_head.weight" not in params  # tied: logits use the embedding
    assert "model.layers.0.self_attn.qkv_proj.bias" in params
    assert "model.layers.0.self_attn.o_proj.bias" not in params
    assert not model.training
    logits = _logits(model)
    assert logits.dtype == torch.float32 and logits.shape == (6, 256)


def test_gguf_goes_through_the_same_table(
    tiny_checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tiny_checkpoints["llama_tied"]
    hf_config = json.loads((folder / "config.json").read_text())
    state_dict = load_file(folder / "model.safetensors")
    fake = types.ModuleType("kvserve.model.gguf")
    fake.load_gguf = lambda path: (hf_config, dict(state_dict))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvserve.model.gguf", fake)
    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"GGUF")
    model = load_model(gguf_file)
    torch.testing.assert_close(_logits(model), _logits(load_model(folder)), rtol=0, atol=0)
    assert model.config.fingerprint != load_model(folder).config.fingerprint


def test_registry_covers_every_architecture() -> None:
    from kvserve.model.config import ARCHITECTURE_FAMILIES

    assert set(MODEL_CLASSES) == set(ARCHITECTURE_FAMILIES)
