"""The small per-layer ops of a decode step, in kvserve's C++ kernels where they apply.

At batch 1 a Llama layer's RMSNorms, RoPE and SiLU * up act on a few hundred floats each, and
torch's composite versions spend several ATen dispatches on each (RMSNorm: ~9 us a call, RoPE
~19 us, on the AVX-512 test machine); the C++ versions (kernels/layer_ops.cpp) take ~1 us.
They apply to float32 tensors on the CPU in eager mode where the kernels build; elsewhere (CUDA,
float16 / bfloat16, under torch.compile, which fuses these itself) torch's ops run. Results
differ from torch's only in the summation order of RMSNorm's mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kvserve.kernels.quant import quant_kernel


def layer_ops(x: Tensor) -> Any | None:
    """The C++ ops module for tensors like `x`, or None where torch's ops run."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return None
    return quant_kernel()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """(T, hidden) -> (T, hidden)."""
    ops = layer_ops(x)
    if ops is None:
        return F.rms_norm(x, weight.shape, weight, eps)
    out: Tensor = ops.rms_norm(x.contiguous(), None, weight, eps)
    return out


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(norm(residual + x), residual + x); the C++ path adds into `residual` in place."""
    ops = layer_ops(x)
    if ops is None or not residual.is_contiguous():
        residual = residual + x  # (T, hidden)
        return F.rms_norm(residual, weight.shape, weight, eps), residual
    out: Tensor = ops.rms_norm(x.contiguous(), residual, weight, eps)
    return out, residual


def rotate_qk(qkv: Tensor, num_rotated: int, positions: Tensor, cos_sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first `num_rotated` heads of qkv (T, heads, head_dim).

    Returns those heads rotated (T, num_rotated, head_dim): in place in `qkv` on the C++ path,
    a new tensor otherwise. `cos_sin` (P, head_dim) holds [cos | sin] per position.
    """
    ops = layer_ops(qkv)
    if ops is None or not qkv.is_contiguous():
        cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # (T, 1, hd // 2) x2
        x1, x2 = qkv[:, :num_rotated].chunk(2, dim=-1)  # (T, n, hd // 2) x2
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (T, n, hd)
    ops.rope_(qkv, num_rotated, cos_sin, positions)
    return qkv[:, :num_rotated]  # (T, num_rotated, head_dim)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of gate_up (T, 2 * I) = [gate | up] -> (T, I)."""
    ops = layer_ops(gate_up)
    if ops is None:
        gate, up = gate_up.chunk(2, dim=-1)  # (T, I) x2
        return F.silu(gate) * up
    out: Tensor = ops.silu_mul(gate_up.contiguous())
    return out
