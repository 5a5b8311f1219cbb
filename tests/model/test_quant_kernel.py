"""kvserve's C++ kernel over GGUF weights as stored (kernels/quant_linear.cpp), in every build.

Dequantizing must give exactly the `gguf` package's values (same float32 operations in the same
order); a linear layer must equal `x @ W^T` on those values up to summation order (fp32
accumulation): max error <= 1e-5 of the sum of |x| |w| terms. Every build this CPU can run is
tested: AVX-512 (on an AVX-512 machine), AVX2, and the portable one.
"""

from __future__ import annotations

import itertools

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from kvserve.kernels.quant import build_for, quant_kernel
from tests.gguf_files import random_blocks
from tests.helpers import decode_kernel_expected

FORMATS = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K, T.F16, T.BF16, T.F32]
# Rows of x: none (a step that samples nothing), the fused remainders (1-3), whole groups of 4,
# odd counts, and more than one 256-row block of the panel path.
ROWS = [0, 1, 2, 3, 4, 7, 33, 70, 300]
# gemv_max_rows: every row count through the panel path, then through the tiled GEMM.
PATHS = {"panels": 1 << 30, "tiles": 0}


def _builds() -> list[str]:
    native = build_for(torch.backends.cpu.get_cpu_capability())
    return {"avx512": ["avx512", "avx2", "portable"], "avx2": ["avx2", "portable"]}.get(
        native, ["portable"]
    )


@pytest.fixture(scope="module", params=_builds())
def kernel(request: pytest.FixtureRequest):  # noqa: ANN201 (an extension module)
    module = quant_kernel(request.param)
    if module is None:
        assert not decode_kernel_expected(), "x86 with AVX2 / AVX-512: the kernel must build"
        pytest.skip("no C++ compiler here: weights are dequantized instead")
    return module


def _stored(rows: int, cols: int, qtype: T, seed: int = 0) -> np.ndarray:
    """(rows, row_bytes) uint8 in `qtype`: quantized random weights, or random K-quant blocks."""
    rng = np.random.default_rng(seed)
    if qtype in (T.Q4_K, T.Q6_K):
        return random_blocks(rows, cols, qtype, rng)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
    if qtype == T.F32:
        return w.view(np.uint8)
    return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(rows, -1)


def _reference(data: np.ndarray, qtype: T, cols: int) -> torch.Tensor:
    values = gguf.quants.dequantize(data, qtype)  # the gguf package's values
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(-1, cols))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_dequantize_equals_the_gguf_package(kernel, qtype: T) -> None:
    cols = 512 if qtype in (T.Q4_K, T.Q6_K) else 96
    data = _stored(37, cols, qtype)
    expected = _reference(data, qtype, cols)  # (37, cols)
    got = kernel.dequantize(torch.from_numpy(data), int(qtype), cols)
    assert torch.equal(got, expected)
    ids = torch.tensor([36, 0, 5, 5])
    assert torch.equal(
        kernel.dequantize_rows(torch.from_numpy(data), int(qtype), cols, ids), expected[ids]
    )


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_float32_matmul(kernel, qtype: T, bias: bool) -> None:
    cols = 512 if qtype in (T.Q4_K, T.Q6_K) else 160  # 160: 5 blocks, an odd count
    rows = 37  # not a multiple of any thread split
    data = torch.from_numpy(_stored(rows, cols, qtype, seed=1))
    weight = _reference(data.numpy(), qtype, cols)  # (rows, cols)
    b = torch.randn(rows) if bias else None
    for m, (path, limit) in itertools.product(ROWS, PATHS.items()):
        x = torch.randn(m, cols)
        got = kernel.quant_linear(x, data, int(qtype), b, limit)  # (m, rows)
        expected = torch.nn.functional.linear(
            x.double(), weight.double(), None if b is None else b.double()
        )
        bound = 1e-5 * (x.abs().double() @ weight.abs().double().T + 1.0)  # (m, rows)
        assert got.shape == (m, rows) and got.dtype == torch.float32
        assert ((got.double() - expected).abs() <= bound).all(), (qtype.name, m, path)


def test_bad_shapes_are_errors_not_crashes(kernel) -> None:
    data = torch.from_numpy(_stored(8, 64, T.Q4_0))  # (8, 36)
    with pytest.raises(RuntimeError, match="row of 36 bytes"):
        kernel.quant_linear(torch.randn(2, 96), data, int(T.Q4_0), None, PATHS["panels"])
    with pytest.raises(RuntimeError, match="unsupported ggml type"):
        kernel.dequantize(data, int(T.Q5_K), 64)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.dequantize_rows(data, int(T.Q4_0), 64, torch.tensor([8]))


def test_kv_write_puts_each_tokens_heads_at_its_slot(kernel) -> None:
    """K and V as the fused qkv output holds them (views, tokens strided) land exactly where
    index_copy_ puts them; other slots keep their values."""
    blocks, block_size, kv_heads, head_dim = 4, 4, 2, 8
    qkv = torch.randn(3, 4 + 2 * kv_heads, head_dim)  # (T, q heads + k + v, head_dim)
    k, v = qkv[:, 4 : 4 + kv_heads], qkv[:, 4 + kv_heads :]  # (T, kv_heads, head_dim) views
    slots = torch.tensor([13, 2, 7])
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim)
    v_cache = torch.randn(blocks, block_size, kv_heads, head_dim)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    want_v.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
    kernel.kv_write_(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(RuntimeError, match="slot 16 out of range"):
        kernel.kv_write_(k_cache, v_cache, k, v, torch.tensor([0, 1, 16]))
    assert torch.equal(k_cache, want_k)  # checked before anything is written
    with pytest.raises(RuntimeError, match="heads contiguous"):
        kernel.kv_write_(k_cache, v_cache, k.transpose(1, 2), v, slots)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_a_row_gets_the_same_bits_alone_or_with_others(kernel, qtype: T) -> None:
    """Batch-1 decode (several weight rows per pass) sums each dot product in the order the
    2-4 row kernels do: a request's tokens do not depend on how many others share its step."""
    cols = 512 if qtype in (T.Q4_K, T.Q6_K) else 160
    data = torch.from_numpy(_stored(37, cols, qtype, seed=2))
    x = torch.randn(4, cols)
    alone = kernel.quant_linear(x[:1], data, int(qtype), None, 64)  # (1, 37)
    for m in (2, 3, 4):
        together = kernel.quant_linear(x[:m], data, int(qtype), None, 64)  # (m, 37)
        assert torch.equal(alone[0], together[0]), (qtype.name, m)
