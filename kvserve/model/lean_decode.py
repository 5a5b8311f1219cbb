"""A Llama decode step without module calls: the eager CPU fast path of batch-1 decode.

At batch 1 a decode step of the default model spends about 6 ms in kernels (121 quantized
matmuls, 30 attention calls, the small per-layer ops) and, through the modules, about 3 ms more
in Python around them: `nn.Module.__call__` and its hooks, attribute lookups, the per-op checks
of which kernel applies, views and splits. `LeanDecode` makes those decisions once, when it is
built, and keeps per layer only the tensors and callables a step needs; a step is then one loop
of direct kernel calls (docs/benchmarks.md: 9.6 -> 7.5 ms a token on the default model).

It computes exactly what the modules compute (the same kernels on the same tensors, in the same
order, so the same bits) and applies only where they would take these kernels: every row of the
step a decode row, float32 activations on the CPU, eager mode, a KV cache, a SiLU MLP, the C++
per-layer ops built. Anything else (prefill, mixed steps, torch.compile, CUDA) runs the modules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvserve.kernels import decode_attention_kernel
from kvserve.kernels.quant import quant_kernel
from kvserve.model.attention import AttentionPlan, KVCache
from kvserve.model.attention.backends import CppDecodeBackend
from kvserve.model.attention.op import write_kv
from kvserve.model.quant_linear import QuantLinear

if TYPE_CHECKING:
    from kvserve.model.llama import LlamaDecoderLayer, LlamaModel

Linear = Callable[[Tensor], Tensor]


class LeanLayer(NamedTuple):
    """One decoder layer's tensors and linears, resolved once."""

    input_norm: Tensor  # (hidden,)
    qkv_proj: Linear
    o_proj: Linear
    post_norm: Tensor  # (hidden,)
    gate_up_proj: Linear
    down_proj: Linear


def direct_linear(module: nn.Module) -> Linear:
    """`module`'s forward as a plain callable: the kernel itself for a one-piece QuantLinear,
    `F.linear` on the parameters for an `nn.Linear`, else the module's own forward."""
    if isinstance(module, QuantLinear) and len(module.qtypes) == 1:
        return module.direct()
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return functools.partial(F.linear, weight=module.weight, bias=module.bias)
    return module.forward


class LeanDecode:
    """The decode step of a `LlamaModel`, layer loop only (embedding and LM head stay with
    the model). Build with `LeanDecode.build`, which returns None where it never applies."""

    def __init__(self, model: LlamaModel, ops: Any) -> None:
        layers = _decoder_layers(model)
        attn = layers[0].self_attn
        self.num_heads, self.num_kv_heads = attn.num_heads, attn.num_kv_heads
        self.head_dim, self.scale = attn.head_dim, attn.scale
        self.eps = model.norm.eps
        self.final_norm = model.norm.weight  # (hidden,)
        self.cos_sin = model.rotary_emb.cos_sin  # (P, head_dim)
        self.ops = ops
        self.layers = [_lean_layer(layer) for layer in layers]

    @staticmethod
    def build(model: LlamaModel) -> LeanDecode | None:
        """The lean step for `model`, or None where its modules would not take the C++ ops:
        not float32 on the CPU, a non-SiLU MLP, or the per-layer ops not built here."""
        norm = model.norm.weight
        if norm.device.type != "cpu" or norm.dtype != torch.float32:
            return None
        if not all(layer.mlp.is_silu for layer in _decoder_layers(model)):
            return None
        ops = quant_kernel()
        return None if ops is None else LeanDecode(model, ops)

    @staticmethod
    def applies(plans: Sequence[AttentionPlan | None], kv_caches: object, num_tokens: int) -> bool:
        """Whether a step takes the lean path: eager, cached, and every row a decode row."""
        if kv_caches is None or torch.compiler.is_compiling():
            return False
        return all(p is not None and p.num_decodes == num_tokens and not p.seqs for p in plans)

    def __call__(
        self,
        x: Tensor,
        positions: Tensor,
        plans: Sequence[AttentionPlan],
        kv_caches: Sequence[KVCache],
    ) -> Tensor:
        """x (T, hidden) embedded decode rows -> (T, hidden) final-normed hidden states."""
        ops, eps, num_tokens = self.ops, self.eps, x.shape[0]
        num_heads, num_kv = self.num_heads, self.num_kv_heads
        attends = {}  # one per distinct plan (sliding window), keyed by identity
        for plan in plans:
            if id(plan) not in attends:
                attends[id(plan)] = _decode_attention(plan, kv_caches[0], self.scale)
        float_cache = kv_caches[0].k.dtype == torch.float32
        residual = x  # (T, hidden)
        h = ops.rms_norm(x, None, self.layers[0].input_norm, eps)  # (T, hidden)
        for i, (layer, plan, kv_cache) in enumerate(
            zip(self.layers, plans, kv_caches, strict=True)
        ):
            if i:
                h = ops.rms_norm(x, residual, layer.input_norm, eps)  # (T, hidden), residual += x
            qkv = layer.qkv_proj(h).view(num_tokens, -1, self.head_dim)  # (T, h + 2 kv, hd)
            ops.rope_(qkv, num_heads + num_kv, self.cos_sin, positions)
            k, v = qkv[:, num_heads : num_heads + num_kv], qkv[:, num_heads + num_kv :]
            slots = plan.slot_mapping
            assert slots is not None, "a cached step has slots"
            if float_cache:  # (T, kv, hd) x2 into the cache at the new tokens' slots
                ops.kv_write_(kv_cache.k, kv_cache.v, k, v, slots)
            else:
                write_kv(k, v, kv_cache, slots)
            q = qkv[:, :num_heads].contiguous()  # (T, num_heads, head_dim)
            attended = attends[id(plan)](q, kv_cache)  # (T, num_heads, head_dim)
            h = layer.o_proj(attended.view(num_tokens, -1))  # (T, hidden)
            h = ops.rms_norm(h, residual, layer.post_norm, eps)  # (T, hidden), residual += h
            x = layer.down_proj(ops.silu_mul(layer.gate_up_proj(h)))  # (T, hidden)
        out: Tensor = ops.rms_norm(x, residual, self.final_norm, eps)  # (T, hidden)
        return out


def _decode_attention(
    plan: AttentionPlan, kv_cache: KVCache, scale: float
) -> Callable[[Tensor, KVCache], Tensor]:
    """The plan's decode attention with everything but (q, layer cache) bound: for the C++
    backend the kernel itself (q contiguous), else the backend's `decode`."""
    backend, decode = plan.backend, plan.decode
    if isinstance(backend, CppDecodeBackend):
        module = decode_attention_kernel(kv_cache.k.dtype)
        assert module is not None, "the backend is chosen where the kernel builds"
        kernel, (table, seq_lens, window) = module.paged_decode_attention, decode
        return lambda q, kv: kernel(
            q, kv.k, kv.v, kv.k_scale, kv.v_scale, table, seq_lens, window or 0, scale
        )
    return lambda q, kv: backend.decode(q, kv, decode, scale)


def _decoder_layers(model: LlamaModel) -> list[LlamaDecoderLayer]:
    return cast("list[LlamaDecoderLayer]", list(model.layers))


def _lean_layer(layer: LlamaDecoderLayer) -> LeanLayer:
    attn, mlp = layer.self_attn, layer.mlp
    return LeanLayer(
        layer.input_layernorm.weight,
        direct_linear(attn.qkv_proj),
        direct_linear(attn.o_proj),
        layer.post_attention_layernorm.weight,
        direct_linear(mlp.gate_up_proj),
        direct_linear(mlp.down_proj),
    )
