"""GGUF weights as stored (`weight_format="auto"`): tiny checkpoints written in each format with
the `gguf` package give the same greedy tokens as dequantizing everything (`"float32"`) and as
transformers on the same file, while the model holds only the stored bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from kvserve.config import EngineConfig
from kvserve.model.loader import load_model
from kvserve.model.quant_linear import QuantEmbedding, QuantLinear
from kvserve.model.stored_weights import read_safetensors, save_stored
from kvserve.sampling_params import SamplingParams
from tests.conftest import _randomize
from tests.gguf_files import TINY_CONFIG, write_gguf
from tests.helpers import make_engine, run_engine

_TINY = {**TINY_CONFIG, "hidden_size": 256, "intermediate_size": 512}  # K-quant blocks: 256
PROMPTS = [[5, 17, 99, 3, 250], [7, 7, 300, 42]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
# A Q4_K_M-like mix: most matrices Q4_K, V and down Q6_K, the embedding Q8_0.
Q4_K_M = {
    "self_attn.q_proj": T.Q4_K, "self_attn.k_proj": T.Q4_K, "self_attn.v_proj": T.Q6_K,
    "self_attn.o_proj": T.Q4_K, "mlp.gate_proj": T.Q4_K, "mlp.up_proj": T.Q4_K,
    "mlp.down_proj": T.Q6_K,
}  # fmt: skip


def _checkpoint(tmp_path: Path, arch: str, formats, tied: bool = True) -> tuple[str, object]:
    config_class = LlamaConfig if arch == "llama" else Qwen2Config
    config = config_class(**_TINY, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, 0)
    state_dict = dict(model.state_dict())
    if tied:
        del state_dict["lm_head.weight"]
    if isinstance(formats, dict):  # per projection -> per HF name; the embedding in Q8_0
        formats = {
            name: formats.get(name.split(".", 3)[-1].rsplit(".", 1)[0], T.Q8_0)
            for name in state_dict
        }
    path = str(tmp_path / f"tiny-{arch}.gguf")
    write_gguf(path, arch, config, state_dict, formats)
    return path, config


def _greedy(model: str, **engine_args: object) -> list[list[int]]:
    outputs = run_engine(make_engine(model, **engine_args), PROMPTS, GREEDY)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _transformers_greedy(path: str, config) -> list[list[int]]:
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config).eval()
    results = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False
            )
            results.append(out[0, len(prompt) :].tolist())
    return results


def _stored_kinds(model: torch.nn.Module) -> dict[str, list[str]]:
    from kvserve.kernels.quant import QUANT_TYPES

    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            kinds[name] = [QUANT_TYPES[t] for t in module.qtypes]
        elif isinstance(module, QuantEmbedding):
            kinds[name] = [QUANT_TYPES[module.qtype]]
    return kinds


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K, T.F16, T.BF16], ids=str)
def test_each_format_as_stored_equals_float32_and_transformers(tmp_path, qtype: T) -> None:
    path, config = _checkpoint(tmp_path, "llama", qtype, tied=False)

    model = load_model(path)
    kinds = _stored_kinds(model)
    assert kinds["model.layers.0.self_attn.qkv_proj"] == [qtype.name]  # q, k, v stacked
    assert kinds["lm_head"] == kinds["model.embed_tokens"] == [qtype.name]
    assert len(kinds) == 2 + 4 * 2  # every matrix of the file

    expected = _transformers_greedy(path, config)
    assert _greedy(path, weight_format="float32") == expected
    assert _greedy(path) == expected  # weight_format="auto", the default


def test_q4_k_m_mix_and_tied_head(tmp_path) -> None:
    path, config = _checkpoint(tmp_path, "llama", Q4_K_M, tied=True)
    kinds = _stored_kinds(load_model(path))
    assert kinds["model.layers.1.self_attn.qkv_proj"] == ["Q4_K", "Q6_K"]  # q+k stacked, v
    assert kinds["model.layers.1.mlp.gate_up_proj"] == ["Q4_K"]
    assert kinds["model.layers.1.mlp.down_proj"] == ["Q6_K"]
    assert kinds["model.embed_tokens"] == ["Q8_0"] and "lm_head" not in kinds  # tied
    expected = _transformers_greedy(path, config)
    assert _greedy(path) == _greedy(path, weight_format="float32") == expected


def test_chunked_prefill_steps_that_sample_nothing(tmp_path) -> None:
    """A 60-token prompt in 8-token chunks: most steps compute logits for no row."""
    path, _ = _checkpoint(tmp_path, "llama", T.Q4_1, tied=True)
    prompt = [(7 * i) % 300 + 3 for i in range(60)]
    outputs = {}
    for weight_format in ("auto", "float32"):
        engine = make_engine(path, weight_format=weight_format, max_num_batched_tokens=8)
        outputs[weight_format] = run_engine(engine, [prompt], GREEDY)[0].outputs[0].token_ids
    assert outputs["auto"] == outputs["float32"] and len(outputs["auto"]) == 16


def test_qwen2_biases_stay_float(tmp_path) -> None:
    path, config = _checkpoint(tmp_path, "qwen2", T.Q8_0)
    model = load_model(path)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantLinear) and qkv.bias is not None and qkv.bias.dtype == torch.float32
    assert (
        _greedy(path)
        == _greedy(path, weight_format="float32")
        == _transformers_greedy(path, config)
    )


def test_resident_weights_are_the_stored_bytes(tmp_path) -> None:
    import gguf

    path, _ = _checkpoint(tmp_path, "llama", T.Q4_0)
    model = load_model(path)
    matrices = [t for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2]
    stored = sum(b.numel() for b in model.buffers() if b.dtype == torch.uint8)
    assert stored == sum(int(t.n_bytes) for t in matrices)
    floats = sum(p.numel() for p in model.parameters())
    assert floats == (2 * 2 + 1) * _TINY["hidden_size"]  # the norm weights only


def test_float32_and_other_dtypes_dequantize(tmp_path) -> None:
    path, _ = _checkpoint(tmp_path, "llama", T.Q4_1)
    assert _stored_kinds(load_model(path, weight_format="float32")) == {}
    assert _stored_kinds(load_model(path, dtype=torch.bfloat16)) == {}  # the kernel is float32


def test_without_the_kernel_weights_are_dequantized(tmp_path, monkeypatch) -> None:
    from kvserve.model import quant_linear

    path, _ = _checkpoint(tmp_path, "llama", T.Q8_0)
    expected = _greedy(path)
    monkeypatch.setattr(quant_linear, "quant_kernel", lambda: None)
    model = load_model(path)
    assert _stored_kinds(model) == {}
    assert _greedy(path) == expected


def test_stored_safetensors_round_trip(tmp_path) -> None:
    from kvserve.model.gguf import load_gguf

    path, config = _checkpoint(tmp_path, "llama", Q4_K_M)
    hf_config, state_dict = load_gguf(path)
    folder = tmp_path / "converted"
    folder.mkdir()
    save_stored(state_dict, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config))

    read_back = dict(read_safetensors([folder / "model.safetensors"]))
    assert sorted(read_back) == sorted(state_dict)
    for name, value in state_dict.items():
        got = read_back[name]
        assert type(got) is type(value), name
        if isinstance(value, torch.Tensor):
            assert torch.equal(got, value), name
        else:
            assert (got.qtype, got.in_features) == (value.qtype, value.in_features), name
            assert torch.equal(got.data, value.data), name
    assert _stored_kinds(load_model(folder)) == _stored_kinds(load_model(path))
    assert _greedy(str(folder)) == _greedy(path)


def test_weight_format_is_validated() -> None:
    with pytest.raises(ValueError, match="weight_format"):
        EngineConfig(weight_format="int4")
