"""GPT-2: learned positions, LayerNorm, gelu_new, fused c_attn, tied LM head.

Names mirror transformers' `GPT2LMHeadModel`. HF stores c_attn/c_proj/c_fc as Conv1D
(in, out) matrices; here they are `nn.Linear` (out, in) and the loader transposes them.
"""

from __future__ import annotations

from torch import Tensor, nn

from kvserve.model.attention import AttentionMetadata, AttentionPlan, KVCache, attention
from kvserve.model.config import ModelConfig
from kvserve.model.layers import CausalLM, get_activation


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.scale = self.head_dim**-0.5

    def forward(self, x: Tensor, kv_cache: KVCache | None, plan: AttentionPlan | None) -> Tensor:
        num_tokens = x.shape[0]
        qkv = self.c_attn(x).view(num_tokens, 3, self.num_heads, self.head_dim)  # (T, 3, h, hd)
        q, k, v = qkv.unbind(dim=1)  # (num_tokens, num_heads, head_dim) x3
        out = attention(q, k, v, kv_cache, plan, self.scale, self.layer_idx)  # (T, heads, hd)
        hidden: Tensor = self.c_proj(out.reshape(num_tokens, -1))  # (num_tokens, hidden)
        return hidden


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.c_proj(self.act(self.c_fc(x)))  # (num_tokens, hidden)
        return out


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: Tensor, kv_cache: KVCache | None, plan: AttentionPlan | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, plan)  # (num_tokens, hidden)
        out: Tensor = x + self.mlp(self.ln_2(x))  # (num_tokens, hidden)
        return out


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
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
        wte, wpe = self.transformer.wte, self.transformer.wpe
        x = wte(input_ids) + wpe(positions)  # (num_tokens, hidden)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_caches is None else kv_caches[i], plans[i])  # (T, hidden)
        hidden: Tensor = self.transformer.ln_f(x)  # (num_tokens, hidden)
        return hidden

    def output_head(self) -> nn.Module:
        return self.transformer.wte if self.lm_head is None else self.lm_head
