"""Read a GGUF checkpoint as an HF-style config dict and a state dict of HF names.

Every tensor is renamed to its HF name and returned as stored: float32 tensors for F32, and
`QuantTensor`s (rows of ggml blocks) for every other type; the loader keeps or dequantizes
them. llama.cpp's
converter permutes the rows of Llama's Q and K weights (interleaved RoPE pairs); `load_gguf`
undoes that, so the result loads into the same modules as an HF checkpoint.

    GGUF name                   HF name
    token_embd.weight           model.embed_tokens.weight
    output_norm.weight          model.norm.weight
    output.weight               lm_head.weight             (absent: tied embeddings)
    blk.N.attn_q.{weight,bias}  model.layers.N.self_attn.q_proj.{weight,bias}   (+ k, v)
    blk.N.attn_output.weight    model.layers.N.self_attn.o_proj.weight
    blk.N.ffn_{gate,up,down}    model.layers.N.mlp.{gate,up,down}_proj.weight
    blk.N.attn_norm.weight      model.layers.N.input_layernorm.weight
    blk.N.ffn_norm.weight       model.layers.N.post_attention_layernorm.weight
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from kvserve.model.quant_linear import F32_TYPE, QuantTensor

_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Architectures whose GGUF Q/K weights were permuted by llama.cpp's converter.
_PERMUTED_QK = frozenset({"llama"})
_QK_NAMES = ("q_proj.weight", "k_proj.weight")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def load_gguf(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor | QuantTensor]]:
    """Read a GGUF file into (HF-style config dict, HF-named state dict).

    F32 tensors come back as float32 tensors; every other tensor as stored (`QuantTensor`:
    its rows of ggml blocks, Q/K rows un-permuted as whole rows). The loader keeps or
    dequantizes them (`weight_format`).

    Raises:
        ValueError: the GGUF architecture is not supported (llama, qwen2), or a tensor name
            has no HF equivalent.
    """
    reader, config = read_gguf_config(path)
    state_dict: dict[str, torch.Tensor | QuantTensor] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        shape = tuple(reversed([int(d) for d in tensor.shape]))  # ggml order is reversed
        num_rows = int(np.prod(shape[:-1]))  # 1 for a vector
        rows = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(num_rows, -1)
        if config["model_type"] in _PERMUTED_QK and name.endswith(_QK_NAMES):
            is_q = name.endswith(_QK_NAMES[0])
            n_head = config["num_attention_heads"] if is_q else config["num_key_value_heads"]
            rows = unpermute_qk(rows, n_head)  # (n_head * head_dim, row_bytes)
        data = torch.from_numpy(np.array(rows))  # (num_rows, row_bytes) uint8, a copy
        if int(tensor.tensor_type) == F32_TYPE:
            state_dict[name] = data.view(torch.float32).reshape(shape)
        else:
            state_dict[name] = QuantTensor(data, int(tensor.tensor_type), shape[-1])
    config["tie_word_embeddings"] = "lm_head.weight" not in state_dict
    return config, state_dict


def read_gguf_config(path: str) -> tuple[Any, dict[str, Any]]:
    """(the file's `gguf.GGUFReader`, its HF-style config dict); reads no tensor data.

    Raises:
        ValueError: the GGUF architecture is not supported (llama, qwen2).
    """
    import gguf

    reader = gguf.GGUFReader(path)
    metadata = _read_metadata(reader)
    arch = metadata.get("general.architecture")
    if arch not in _HF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {path}; "
            f"supported: {', '.join(sorted(_HF_ARCHITECTURES))}"
        )
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return reader, gguf_config(metadata, vocab_size=int(embedding.shape[1]))  # (hidden, vocab)


def hf_tensor_name(gguf_name: str) -> str:
    """The HF parameter name of a GGUF tensor name; ValueError if it has none."""
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    match = _GLOBAL_RE.match(gguf_name)
    if match and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF equivalent")


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (per head: interleaved pairs -> rotate-half)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])  # (h, d/2, 2, in)
        .swapaxes(1, 2)  # (h, 2, d/2, in)
        .reshape(weight.shape)  # (h * d, in)
    )


def gguf_config(metadata: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """An HF-style config dict from GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys)."""
    arch = metadata["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(
            f"GGUF rope scaling {scaling!r} ({arch}.rope.scaling.type) is not supported"
        )
    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    rope_theta = float(get("rope.freq_base", 10000.0))
    head_dim = get("attention.key_length", get("rope.dimension_count", hidden_size // num_heads))
    config: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden_size,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": vocab_size,
        "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in metadata:
            config[key] = int(metadata[f"tokenizer.ggml.{key}"])
    return config


def _read_metadata(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata fields (arrays such as the vocabulary are skipped)."""
    import gguf

    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            metadata[name] = field.contents()
    return metadata
