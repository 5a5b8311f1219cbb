"""Tiny GGUF checkpoints written with the `gguf` package, in any of the formats kvserve reads.

Matrices are quantized with `gguf.quants.quantize` where it implements the format (Q4_0, Q4_1,
Q8_0, F16, BF16). It does not implement the K-quants, so Q4_K and Q6_K matrices are random
blocks with scales chosen to give weights of a sane size: the model is whatever the blocks
decode to, and every reader (kvserve, transformers) decodes the same file.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

# A tiny Llama / Qwen2 config (transformers' keyword arguments).
TINY_CONFIG = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=5000.0,
    bos_token_id=1,
    eos_token_id=2,
)
# The K-quants: byte offset of the float16 super-block scale d, and its largest value (weights
# of about 0.1, like tests/conftest.py's).
_SCALE_FIELDS = {T.Q4_K: (0, 1e-3), T.Q6_K: (208, 1e-4)}
_LAYER_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBALS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def random_blocks(rows: int, cols: int, qtype: T, rng: np.random.Generator) -> np.ndarray:
    """(rows, row_bytes) uint8: random Q4_K or Q6_K blocks with sane scales.

    Q4_K values are (d * scale) * q - (dmin * min): each sub-block's min is set equal to its
    scale and dmin to 7.5 d, so every sub-block is centred on zero like a real weight.
    """
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    num_blocks = rows * cols // block_values
    blocks = rng.integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)
    offset, largest = _SCALE_FIELDS[qtype]
    d = rng.uniform(0.25 * largest, largest, size=num_blocks).astype(np.float16)
    blocks[:, offset : offset + 2] = d.view(np.uint8).reshape(num_blocks, 2)
    if qtype == T.Q4_K:
        dmin = (d.astype(np.float32) * 7.5).astype(np.float16)
        blocks[:, 2:4] = dmin.view(np.uint8).reshape(num_blocks, 2)
        blocks[:, 8:12] = blocks[:, 4:8]  # mins 0-3 (and their high bits) = scales 0-3
        low = blocks[:, 12:16] & 0x0F
        blocks[:, 12:16] = low | (low << 4)  # scales and mins 4-7 share their low nibbles
    return blocks.reshape(rows, -1)


def stored(w: np.ndarray, qtype: T, rng: np.random.Generator) -> np.ndarray:
    """`w` (rows, cols) float32 in `qtype`: quantized where gguf implements it, else random
    blocks (see the module docstring)."""
    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype in (T.Q4_K, T.Q6_K):
        return random_blocks(*w.shape, qtype, rng)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def gguf_name(hf_name: str) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base in _GLOBALS:
        return f"{_GLOBALS[base]}.{kind}"
    _, _, layer, part = base.split(".", 3)
    return f"blk.{layer}.{_LAYER_PARTS[part]}.{kind}"


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_gguf(
    path: str,
    arch: str,
    config,
    state_dict: dict[str, torch.Tensor],
    formats: dict[str, T] | T = T.F32,
    seed: int = 0,
) -> None:
    """Write an HF Llama / Qwen2 state dict as llama.cpp's converter would: Q/K rows permuted
    (llama), matrices in `formats` (one type, or per HF name, F32 for names not given),
    vectors in F32."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    for name, tensor in state_dict.items():
        w = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = permute_qk(w, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = permute_qk(w, config.num_key_value_heads)
        qtype = formats.get(name, T.F32) if isinstance(formats, dict) else formats
        if w.ndim == 1 or qtype == T.F32:
            writer.add_tensor(gguf_name(name), w)
        else:
            writer.add_tensor(gguf_name(name), stored(w, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
