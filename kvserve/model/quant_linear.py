"""Layers whose weights stay in their GGUF block format: `QuantLinear`, `QuantEmbedding`.

A `QuantTensor` is one checkpoint matrix as stored: (rows, row_bytes) uint8, each row its
`in_features` values in ggml blocks of one type. `QuantLinear` computes `x @ W^T + b` through
kvserve's C++ kernel (kvserve/kernels/quant.py), which dequantizes blocks in registers or L1
and accumulates in float32, so the output equals `F.linear` on the dequantized float32 weight
up to summation order. A fused layer (qkv_proj, gate_up_proj) whose pieces are stored in
different formats keeps one `QuantTensor` per piece and concatenates their outputs.

Under torch.compile the kernel is the opaque op `kvserve::quant_linear`; eager calls go to the
extension directly (the dispatcher costs microseconds, and a decode step calls it ~120 times).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kvserve.kernels.quant import QUANT_TYPES, gemv_max_rows, quant_kernel

F32_TYPE = 0  # ggml's id for float32: a float tensor joining quantized pieces
_GEMV_MAX_ROWS = gemv_max_rows()  # this CPU's build: where the kernel's panel path stops


@dataclass(frozen=True)
class QuantTensor:
    """A (rows, in_features) matrix as stored: `data` (rows, row_bytes) uint8 of ggml `qtype`."""

    data: Tensor
    qtype: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.in_features)

    @staticmethod
    def from_float(weight: Tensor) -> QuantTensor:
        """A float32 (rows, in) matrix as ggml F32 rows, to sit beside quantized pieces."""
        rows = weight.detach().float().contiguous().clone()  # (rows, in), its own storage
        return QuantTensor(rows.view(torch.uint8), F32_TYPE, rows.shape[1])

    @property
    def kernel_reads(self) -> bool:
        """Whether kvserve's C++ kernel reads this format (and builds on this machine)."""
        return self.qtype in QUANT_TYPES and quant_kernel() is not None

    def dequantize(self) -> Tensor:
        """(rows, in_features) float32: by the C++ kernel where it reads the format, else by
        the `gguf` package (the same values)."""
        if self.kernel_reads:
            out: Tensor = _kernel().dequantize(self.data, self.qtype, self.in_features)
            return out
        import gguf

        kind = gguf.GGMLQuantizationType(self.qtype)
        values = gguf.quants.dequantize(self.data.numpy(), kind)  # (rows, in)
        return torch.from_numpy(np.array(values, dtype=np.float32))


def _kernel() -> Any:
    module = quant_kernel()
    assert module is not None, "quantized weights are kept only where the kernel builds"
    return module


@torch.library.custom_op("kvserve::quant_linear", mutates_args=())
def _quant_linear_op(x: Tensor, data: Tensor, qtype: int, bias: Tensor | None) -> Tensor:
    out: Tensor = _kernel().quant_linear(x, data, qtype, bias, _GEMV_MAX_ROWS)
    return out


@_quant_linear_op.register_fake
def _(x: Tensor, data: Tensor, qtype: int, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], data.shape[0]))  # (M, N)


@torch.library.custom_op("kvserve::quant_rows", mutates_args=())
def _quant_rows_op(data: Tensor, qtype: int, in_features: int, ids: Tensor) -> Tensor:
    out: Tensor = _kernel().dequantize_rows(data, qtype, in_features, ids)
    return out


@_quant_rows_op.register_fake
def _(data: Tensor, qtype: int, in_features: int, ids: Tensor) -> Tensor:
    return torch.empty((ids.shape[0], in_features), dtype=torch.float32)  # (T, in)


def quant_matmul(x: Tensor, data: Tensor, qtype: int, bias: Tensor | None = None) -> Tensor:
    """(M, in) float32 @ W^T (+ bias) -> (M, rows) float32; W = `data` of ggml `qtype`."""
    x = x.contiguous()  # (M, in)
    if torch.compiler.is_compiling():
        out: Tensor = _quant_linear_op(x, data, qtype, bias)
        return out
    out = _kernel().quant_linear(x, data, qtype, bias, _GEMV_MAX_ROWS)
    return out  # (M, rows)


class QuantLinear(nn.Module):
    """`nn.Linear` over stored-format weights: one stored matrix per stacked piece, kept as
    buffers `piece0`, `piece1`, ... with their ggml types in `qtypes`."""

    def __init__(self, pieces: list[QuantTensor], bias: Tensor | None) -> None:
        super().__init__()
        if len({p.in_features for p in pieces}) != 1:
            raise ValueError("QuantLinear: pieces differ in in_features")
        self.qtypes = [p.qtype for p in pieces]
        self.in_features = pieces[0].in_features
        self.out_features = sum(p.shape[0] for p in pieces)
        for i, piece in enumerate(pieces):  # buffers: .to() and named_buffers see them
            self.register_buffer(f"piece{i}", piece.data, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    piece0: Tensor  # (rows, row_bytes) uint8; piece1, ... likewise

    def forward(self, x: Tensor) -> Tensor:
        """(T, in) -> (T, out)."""
        if len(self.qtypes) == 1:
            return quant_matmul(x, self.piece0, self.qtypes[0], self.bias)  # (T, out)
        outs = [quant_matmul(x, getattr(self, f"piece{i}"), t) for i, t in enumerate(self.qtypes)]
        out = torch.cat(outs, dim=-1)  # (T, out)
        return out if self.bias is None else out + self.bias

    def direct(self) -> Callable[[Tensor], Tensor]:
        """This one-piece layer's eager forward as a closure over the kernel: no module call,
        no checks per call (lean_decode.py calls it ~120 times a step). x must be contiguous."""
        assert len(self.qtypes) == 1, "direct() is for one-piece layers"
        linear, data, qtype, bias = _kernel().quant_linear, self.piece0, self.qtypes[0], self.bias
        return lambda x: linear(x, data, qtype, bias, _GEMV_MAX_ROWS)

    def extra_repr(self) -> str:
        kinds = "+".join(QUANT_TYPES[t] for t in self.qtypes)
        return f"in_features={self.in_features}, out_features={self.out_features}, {kinds}"


class QuantEmbedding(nn.Module):
    """`nn.Embedding` over a stored-format table; a tied LM head multiplies by it too."""

    piece0: Tensor  # (vocab, row_bytes) uint8

    def __init__(self, table: QuantTensor) -> None:
        super().__init__()
        self.qtype = table.qtype
        self.num_embeddings, self.embedding_dim = table.shape
        self.register_buffer("piece0", table.data, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        """(T,) int64 -> (T, hidden) float32."""
        if torch.compiler.is_compiling():
            out: Tensor = _quant_rows_op(self.piece0, self.qtype, self.embedding_dim, ids)
            return out
        out = _kernel().dequantize_rows(self.piece0, self.qtype, self.embedding_dim, ids)
        return out

    def logits(self, hidden: Tensor) -> Tensor:
        """(n, hidden) -> (n, vocab): the tied LM head."""
        return quant_matmul(hidden, self.piece0, self.qtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {QUANT_TYPES[self.qtype]}"
