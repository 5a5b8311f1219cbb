"""Llama family: Llama (SmolLM2, TinyLlama), Mistral (sliding window), Qwen2 (q/k/v bias).

Names mirror transformers' `LlamaForCausalLM`, except that q/k/v are fused into `qkv_proj`
and gate/up into `gate_up_proj` (the loader stacks the HF tensors, see loader.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from kvserve.model.attention import AttentionMetadata, AttentionPlan, KVCache, attention
from kvserve.model.config import ModelConfig
from kvserve.model.fast_ops import rotate_qk, silu_mul
from kvserve.model.layers import CausalLM, MergedLinear, RMSNorm, RotaryEmbedding, get_activation
from kvserve.model.lean_decode import LeanDecode

# A layer's RoPE inputs: positions (T,) and the cos/sin table (P, head_dim) they index.
Rope = tuple[Tensor, Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, [q_size, kv_size, kv_size], bias=config.attention_bias
        )
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_proj_bias)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: Tensor,
        rope: Rope,
        kv_cache: KVCache | None,
        plan: AttentionPlan | None,
    ) -> Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(num_tokens, -1, self.head_dim)  # (T, heads + 2 kv, hd)
        qk = rotate_qk(qkv, self.num_heads + self.num_kv_heads, *rope)  # (T, h + kv, hd)
        q, k = torch.split(qk, [self.num_heads, self.num_kv_heads], dim=1)  # (T, h|kv, hd)
        v = qkv[:, self.num_heads + self.num_kv_heads :]  # (T, num_kv_heads, head_dim)
        out = attention(q, k, v, kv_cache, plan, self.scale, self.layer_idx)  # (T, heads, hd)
        hidden: Tensor = self.o_proj(out.reshape(num_tokens, -1))  # (T, hidden)
        return hidden


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias=config.mlp_bias)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=config.mlp_bias)
        self.act = get_activation(config.hidden_act)
        self.is_silu = config.hidden_act == "silu"

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)  # (T, 2 * intermediate)
        if self.is_silu:
            activated = silu_mul(gate_up)  # (T, intermediate)
        else:
            gate, up = gate_up.chunk(2, dim=-1)  # (T, intermediate) x2
            activated = self.act(gate) * up
        out: Tensor = self.down_proj(activated)  # (T, hidden)
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None,
        rope: Rope,
        kv_cache: KVCache | None,
        plan: AttentionPlan | None,
    ) -> tuple[Tensor, Tensor]:
        """(this layer's MLP output, the residual stream before it): the next layer (or the
        final norm) adds the two, in its norm. The first layer gets residual=None."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)  # (T, hidden) x2
        else:
            h, residual = self.input_layernorm.add_norm(x, residual)  # (T, hidden) x2
        h = self.self_attn(h, rope, kv_cache, plan)  # (T, hidden)
        h, residual = self.post_attention_layernorm.add_norm(h, residual)  # (T, hidden) x2
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(CausalLM):
    """Llama, Mistral and Qwen2: their differences are all in `ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # All-decode eager steps skip the modules where they can (lean_decode.py: the same
        # kernels, the same bits); False runs the modules always, to compare.
        self.use_lean_decode = True
        self._lean: LeanDecode | None | Literal[False] = False  # False: not built yet
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        attn_metadata: AttentionMetadata | None,
        kv_caches: list[KVCache] | None,
    ) -> Tensor:
        plans = self.plan_layers(attn_metadata, kv_caches is not None, input_ids.device)
        x = self.model.embed_tokens(input_ids)  # (num_tokens, hidden)
        if self.use_lean_decode and LeanDecode.applies(plans, kv_caches, len(input_ids)):
            lean = self._lean_decode()
            if lean is not None:
                assert kv_caches is not None
                return lean(x, positions, plans, kv_caches)  # type: ignore[arg-type]
        rope = (positions, self.model.rotary_emb.cos_sin)
        residual = None
        for i, layer in enumerate(self.model.layers):
            kv_cache = None if kv_caches is None else kv_caches[i]
            x, residual = layer(x, residual, rope, kv_cache, plans[i])  # (T, hidden) x2
        assert residual is not None, "a model has at least one layer"
        hidden, _ = self.model.norm.add_norm(x, residual)  # (num_tokens, hidden)
        return hidden

    def _lean_decode(self) -> LeanDecode | None:
        """The module-free decode step (lean_decode.py), built at the first decode step: the
        weights are loaded and placed by then, and stay put."""
        if self._lean is False:
            self._lean = LeanDecode.build(self.model)
        return self._lean

    def output_head(self) -> nn.Module:
        return self.model.embed_tokens if self.lm_head is None else self.lm_head
