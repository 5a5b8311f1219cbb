"""Building blocks shared by the model files: the `CausalLM` contract, fused linears, RoPE."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvserve.model.attention import AttentionMetadata, AttentionPlan, KVCache, plan_attention
from kvserve.model.config import ModelConfig
from kvserve.model.fast_ops import add_rms_norm, rms_norm
from kvserve.model.quant_linear import QuantEmbedding

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act: activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


class CausalLM(nn.Module):
    """What the model runner calls: `forward` for hidden states, `compute_logits` for logits.

    Subclasses set `config` and implement `forward` and `output_head`.
    """

    config: ModelConfig

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        attn_metadata: AttentionMetadata | None,
        kv_caches: list[KVCache] | None,
    ) -> Tensor:
        """(num_tokens,) ids and positions of the flat batch -> (num_tokens, hidden).

        `attn_metadata=None` (with `kv_caches=None`) is the compiled form: every layer calls
        the opaque `kvserve::attention` op, which reads plans and caches from the enclosing
        `attention_step` (see attention/op.py).
        """
        raise NotImplementedError

    def output_head(self) -> nn.Module:
        """The LM head: an `nn.Linear` (or `QuantLinear`) without bias, or the input embedding
        (`nn.Embedding` or `QuantEmbedding`) when tied."""
        raise NotImplementedError

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype hidden states are computed in (the float parameters' dtype)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        """(n, hidden) -> (n, vocab) float32; pass only the rows that are sampled."""
        head = self.output_head()
        if isinstance(head, nn.Embedding):
            return F.linear(hidden_states, head.weight).float()  # (n, vocab)
        if isinstance(head, QuantEmbedding):
            return head.logits(hidden_states)  # (n, vocab)
        logits: Tensor = head(hidden_states)  # (n, vocab)
        return logits.float()

    def plan_layers(
        self, md: AttentionMetadata | None, cached: bool, device: torch.device
    ) -> list[AttentionPlan | None]:
        """One attention plan per layer, built once per distinct sliding window.

        Without metadata (the compiled form) every layer gets None: the plans travel through
        `attention_step` instead.
        """
        windows = self.config.layer_sliding_windows
        if md is None:
            return [None] * len(windows)
        plans = {w: plan_attention(md, w, cached, device) for w in set(windows)}
        return [plans[w] for w in windows]


class MergedLinear(nn.Linear):
    """A linear layer whose output rows stack several HF projections (qkv_proj, gate_up_proj).

    `output_sizes` gives each projection's rows, in order; the loader fills them shard by shard.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))  # (hidden,)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)  # (num_tokens, hidden)

    def add_norm(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(residual + x), residual + x): a pre-norm layer's residual add and norm in one
        (`residual` may be updated in place)."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """HF rotate-half RoPE's cos/sin table for every position, computed once; layers rotate
    with `fast_ops.rotate_qk` (same values as HF's `x * cos + rotate_half(x) * sin`).

    The table is built on the CPU even when the model is built on the meta device (the loader
    then moves it with `.to(device)`). Row p is [cos(p * inv_freq) | sin(p * inv_freq)].
    """

    cos_sin: Tensor  # (max_position_embeddings, head_dim)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq = _inv_freq(config)  # (head_dim // 2,)
        positions = torch.arange(config.max_position_embeddings, device="cpu").float()  # (P,)
        freqs = torch.outer(positions, inv_freq)  # (P, head_dim // 2)
        table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # (P, head_dim)
        self.register_buffer("cos_sin", table, persistent=False)


def _inv_freq(config: ModelConfig) -> Tensor:
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # (hd/2,)
    inv_freq = 1.0 / (config.rope_theta**exponents)  # (head_dim // 2,)
    params = dict(config.rope_scaling)
    if config.rope_type == "linear":
        return inv_freq / params["factor"]  # (head_dim // 2,)
    if config.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    return inv_freq


def _llama3_inv_freq(inv_freq: Tensor, params: dict[str, float]) -> Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between
    # (transformers' `_compute_llama3_parameters`, same operations in the same order).
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # (head_dim // 2,)
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # (hd // 2,)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # (head_dim // 2,)
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)  # (hd // 2,)
    return torch.where(is_medium, smoothed, scaled)  # (head_dim // 2,)
