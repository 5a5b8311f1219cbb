"""ModelConfig from HF config dicts: transformers 5 and older spellings, windows, fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve.kv.sizing import kv_bytes_per_token
from kvserve.model.config import ModelConfig

LLAMA_V4 = {  # a transformers 4 config.json (SmolLM2-135M's shape)
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _read(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_transformers4_llama_config() -> None:
    config = ModelConfig.from_hf_config(LLAMA_V4, [("model.safetensors", 538_000_000)])
    assert (config.head_dim, config.num_key_value_heads, config.rope_theta) == (64, 3, 1e5)
    assert (config.rope_type, config.rope_scaling) == ("default", ())
    assert config.tie_word_embeddings and config.eos_token_ids == (2,)
    assert config.sliding_window is None and config.layer_sliding_windows == (None,) * 30
    shape = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    assert kv_bytes_per_token(*shape, "float16").total == 2 * 30 * 3 * 64 * 2


def test_rope_scaling_spellings() -> None:
    linear = ModelConfig.from_hf_config(
        {**LLAMA_V4, "rope_scaling": {"type": "linear", "factor": 2}}
    )
    assert (linear.rope_type, linear.rope_scaling) == ("linear", (("factor", 2),))
    yarn = {**LLAMA_V4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match=r"rope_scaling.*'yarn'.*llama3"):
        ModelConfig.from_hf_config(yarn)


def test_tiny_checkpoint_configs(tiny_checkpoints: dict) -> None:
    head_dim = ModelConfig.from_hf_config(_read(tiny_checkpoints["llama_head_dim"]))
    assert (head_dim.head_dim, head_dim.attention_bias, head_dim.o_proj_bias) == (32, True, True)
    assert head_dim.rope_type == "llama3" and dict(head_dim.rope_scaling)["factor"] == 8.0
    mistral = ModelConfig.from_hf_config(_read(tiny_checkpoints["mistral"]))
    assert mistral.sliding_window == 8 and mistral.layer_sliding_windows == (8, 8)
    qwen2 = ModelConfig.from_hf_config(_read(tiny_checkpoints["qwen2"]))
    assert (qwen2.attention_bias, qwen2.o_proj_bias, qwen2.sliding_window) == (True, False, None)
    assert qwen2.eos_token_ids == (2, 3)
    qwen2_swa = ModelConfig.from_hf_config(_read(tiny_checkpoints["qwen2_swa"]))
    assert qwen2_swa.sliding_window is None  # layer 0 attends to everything
    assert qwen2_swa.layer_sliding_windows == (None, 8)
    gpt2 = ModelConfig.from_hf_config(_read(tiny_checkpoints["gpt2"]))
    assert (gpt2.hidden_size, gpt2.intermediate_size, gpt2.head_dim) == (64, 256, 16)
    assert gpt2.tie_word_embeddings
    hub_gpt2 = {
        k: v for k, v in _read(tiny_checkpoints["gpt2"]).items() if k != "tie_word_embeddings"
    }
    assert ModelConfig.from_hf_config(hub_gpt2).tie_word_embeddings  # absent: tied, as in HF
    assert (gpt2.hidden_act, gpt2.max_position_embeddings, gpt2.eos_token_ids) == (
        "gelu_new",
        128,
        (255,),
    )


def test_qwen2_transformers4_windows() -> None:
    hf = {**LLAMA_V4, "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 4}
    hf.update(use_sliding_window=True, sliding_window=16, max_window_layers=2)
    config = ModelConfig.from_hf_config(hf)
    assert config.layer_sliding_windows == (None, None, 16, 16)
    config = ModelConfig.from_hf_config({**hf, "max_window_layers": 0})
    assert config.sliding_window == 16
    config = ModelConfig.from_hf_config({**hf, "use_sliding_window": False})
    assert config.layer_sliding_windows == (None,) * 4


def test_fingerprint_is_stable_and_specific() -> None:
    files = [("b.safetensors", 10), ("a.safetensors", 20)]
    first = ModelConfig.from_hf_config(LLAMA_V4, files).fingerprint
    reordered = dict(reversed(list(LLAMA_V4.items())))
    assert ModelConfig.from_hf_config(reordered, files[::-1]).fingerprint == first
    assert len(first) == 64 and int(first, 16) >= 0
    assert ModelConfig.from_hf_config(LLAMA_V4, [("a.safetensors", 21)]).fingerprint != first
    assert ModelConfig.from_hf_config({**LLAMA_V4, "rope_theta": 1e4}, files).fingerprint != first


def test_bad_configs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="'BertModel'.*supported"):
        ModelConfig.from_hf_config({**LLAMA_V4, "architectures": ["BertModel"]})
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        ModelConfig.from_hf_config({k: v for k, v in LLAMA_V4.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_hf_config({**LLAMA_V4, "num_key_value_heads": 4})
    by_type = {k: v for k, v in LLAMA_V4.items() if k != "architectures"}
    assert ModelConfig.from_hf_config(by_type).architecture == "LlamaForCausalLM"
