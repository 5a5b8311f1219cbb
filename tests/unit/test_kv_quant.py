"""KV storage formats (kv/quant.py): round trips within each dtype's error bound, on random
and adversarial rows, and writes/reads/copies through the paged layout."""

from __future__ import annotations

import pytest
import torch

from kvserve.kv import quant


def _adversarial() -> dict[str, torch.Tensor]:
    """(tokens, kv_heads, head_dim) inputs that break careless quantizers."""
    gen = torch.Generator().manual_seed(0)
    random = torch.randn(32, 3, 64, generator=gen)
    outliers = random.clone()
    outliers[:, :, 7] = 300.0  # one huge channel, as LLM keys have
    outliers[5, 1, 3] = -1e4
    zeros = torch.zeros(4, 3, 64)
    constant = torch.full((4, 3, 64), -2.5)
    tiny = random * 1e-30
    mixed_rows = torch.cat([zeros, random[:4], constant])
    return {
        "random": random,
        "outliers": outliers,
        "zeros": zeros,
        "constant": constant,
        "tiny": tiny,
        "mixed_rows": mixed_rows,
    }


@pytest.mark.parametrize("name", list(_adversarial()))
def test_int8_round_trip_error_is_at_most_half_a_step_per_row(name: str) -> None:
    x = _adversarial()[name]
    q, scale = quant.quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == x.shape[:-1]
    assert int(q.abs().max()) <= 127
    back = quant.dequantize(q, scale, torch.float32)
    # Rounding to the nearest step of size scale: error <= scale / 2 (plus float slack).
    bound = scale.unsqueeze(-1) * (0.5 + 1e-5)
    assert torch.all((back - x).abs() <= bound + 1e-30)
    assert torch.isfinite(back).all()


def test_int8_keeps_each_rows_maximum_exact_and_zero_rows_zero() -> None:
    x = _adversarial()["mixed_rows"]
    q, scale = quant.quantize_int8(x)
    back = quant.dequantize(q, scale, torch.float32)
    assert torch.equal(back[:4], torch.zeros(4, 3, 64))  # all-zero rows: scale 1, values 0
    assert torch.all(scale[:4] == 1)
    amax_row = x.abs().amax(-1)
    assert torch.allclose(back.abs().amax(-1), amax_row, rtol=1e-6)
    assert torch.allclose(back[8:], x[8:], rtol=1e-6)  # a constant row is exact


def test_int8_relative_error_on_gaussian_rows_is_small() -> None:
    x = _adversarial()["random"]
    back = quant.dequantize(*quant.quantize_int8(x), torch.float32)
    rel = (back - x).norm() / x.norm()
    assert rel < 0.01  # ~max/127/sqrt(12) per element for unit-variance rows


@pytest.mark.parametrize("name", list(_adversarial()))
def test_fp8_round_trip_within_e4m3_relative_step(name: str) -> None:
    x = _adversarial()[name]
    back = quant.dequantize(quant.quantize_fp8(x), None, torch.float32)
    clipped = x.clamp(-448, 448)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal numbers; below the
    # smallest subnormal step (2^-9) the absolute error is at most half that step.
    bound = clipped.abs() * 2**-4 + 2**-10
    assert torch.all((back - clipped).abs() <= bound)
    assert torch.isfinite(back).all()


def test_fp8_saturates_instead_of_overflowing() -> None:
    x = torch.tensor([1e4, -1e4, 448.0, 500.0])
    back = quant.quantize_fp8(x).float()
    assert back.tolist() == [448.0, -448.0, 448.0, 448.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_round_trip(dtype: torch.dtype) -> None:
    x = _adversarial()["random"]
    back = quant.dequantize(x.to(dtype), None, torch.float32)
    eps = torch.finfo(dtype).eps
    assert torch.all((back - x).abs() <= x.abs() * eps)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("auto", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
     ("fp8_e4m3", torch.float8_e4m3fn), ("int8", torch.int8)],
)  # fmt: skip
def test_storage_dtype(name: str, expected: torch.dtype) -> None:
    assert quant.storage_dtype(name, torch.float32) == expected


def test_storage_dtype_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        quant.storage_dtype("int3", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float8_e4m3fn, torch.int8])
def test_write_read_copy_through_the_paged_layout(dtype: torch.dtype) -> None:
    num_blocks, block_size, kvh, hd = 6, 4, 3, 64
    layer = quant.allocate_layer(num_blocks, block_size, kvh, hd, dtype, torch.device("cpu"))
    assert (layer.k_scale is not None) == (dtype == torch.int8)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(5, kvh, hd, generator=gen)
    v = torch.randn(5, kvh, hd, generator=gen) * 10
    slots = torch.tensor([8, 9, 10, 11, 12])  # block 2 whole, then block 3 offset 0
    quant.write_layer(layer, k, v, slots)
    k_blocks = quant.read_blocks(layer.k, layer.k_scale, torch.tensor([[2, 3]]), torch.float32)
    v_blocks = quant.read_blocks(layer.v, layer.v_scale, torch.tensor([[2, 3]]), torch.float32)
    assert k_blocks.shape == (1, 2, block_size, kvh, hd)
    got_k = k_blocks.view(-1, kvh, hd)[:5]
    got_v = v_blocks.view(-1, kvh, hd)[:5]
    tolerance = {torch.float32: 0, torch.float16: 1e-3, torch.float8_e4m3fn: 0.07, torch.int8: 0.01}
    assert torch.allclose(got_k, k, rtol=tolerance[dtype], atol=tolerance[dtype] * 4)
    assert torch.allclose(got_v, v, rtol=tolerance[dtype], atol=tolerance[dtype] * 40)
    # untouched slots read back as zeros (finite, whatever the scale)
    assert torch.equal(k_blocks.view(-1, kvh, hd)[5:], torch.zeros(3, kvh, hd))
    # copy-on-write moves data and scales together
    quant.copy_layer_blocks(layer, torch.tensor([2]), torch.tensor([5]))
    copied = quant.read_blocks(layer.k, layer.k_scale, torch.tensor([5]), torch.float32)
    assert torch.equal(copied[0], k_blocks[0, 0])


def test_int4_packing_round_trips_every_nibble_pair() -> None:
    q = torch.arange(16, dtype=torch.uint8).repeat_interleave(16).view(16, 16)  # all pairs
    q = torch.stack([q.flatten(), q.t().flatten()], dim=-1).view(-1, 8)  # (64, 8): 256 pairs
    packed = quant.pack_int4(q)
    assert packed.shape == (64, 4) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed), q)


@pytest.mark.parametrize("name", list(_adversarial()))
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(name: str) -> None:
    x = _adversarial()[name]
    q, scale, zero = quant.quantize_int4(x, dim=-1)
    assert int(q.max()) <= 15 and scale.dtype == zero.dtype == torch.float16
    back = q.float() * scale.float() + zero.float()
    step = scale.float()
    # half a step from rounding, plus float16 rounding of the zero point (at most 2^-11 of it)
    bound = step * 0.5 + zero.float().abs() * 2**-11 + 1e-6
    assert torch.all((back - x).abs() <= bound)
    assert torch.isfinite(back).all()


def _int4_layer(block_size: int = 4) -> quant.LayerKV:
    return quant.allocate_layer(4, block_size, 3, 64, torch.uint8, torch.device("cpu"))


def test_int4_keys_per_channel_requantize_a_block_as_it_fills() -> None:
    """Tokens written one at a time (decode) read back as well as a block written at once."""
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(4, 3, 64, generator=gen)
    k[:, :, 5] *= 50  # an outlier channel: per-channel groups keep it from hurting others
    one_by_one, at_once = _int4_layer(), _int4_layer()
    for t in range(4):
        slot = torch.tensor([8 + t])  # block 2
        quant.write_layer(one_by_one, k[t : t + 1], k[t : t + 1], slot)
    quant.write_layer(at_once, k, k, torch.arange(8, 12))
    for layer in (one_by_one, at_once):
        got = quant.read_blocks(layer.k, layer.k_scale, torch.tensor([2]), torch.float32)[0]
        assert layer.k_scale is not None
        step = layer.k_scale[2, 0].float()  # (kvh, hd) per-channel step
        error = (got - k).abs()
        # per channel: half a step, doubled at most by requantizing an earlier token
        assert torch.all(error <= step * 1.01 + 1e-3)
        normal = [c for c in range(64) if c != 5]
        assert error[..., normal].max() < 0.5  # the outlier channel's step stays its own


def test_int4_keys_ignore_stale_slots_of_a_partly_filled_block() -> None:
    layer = _int4_layer()
    stale = torch.full((4, 3, 64), 1000.0)
    quant.write_layer(layer, stale, stale, torch.arange(8, 12))  # a previous owner's tokens
    fresh = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    quant.write_layer(layer, fresh, fresh, torch.tensor([8, 9]))  # a new owner refills it
    got = quant.read_blocks(layer.k, layer.k_scale, torch.tensor([2]), torch.float32)[0]
    assert (got[:2] - fresh).abs().max() < 0.5  # the stale 1000s did not stretch the range
    assert torch.isfinite(got).all()


def test_int4_values_per_token_groups_of_32() -> None:
    layer = _int4_layer()
    v = torch.randn(3, 3, 64, generator=torch.Generator().manual_seed(4))
    v[:, :, 40] = 80  # an outlier in the second group only
    quant.write_layer(layer, v, v, torch.tensor([1, 2, 13]))
    assert layer.v_scale is not None and layer.v_scale.shape == (4, 4, 3, 2, 2)
    got = quant.read_blocks(layer.v, layer.v_scale, torch.tensor([0, 3]), torch.float32)
    rows = torch.stack([got[0, 1], got[0, 2], got[1, 1]])  # slots 1, 2, 13
    assert (rows[..., :32] - v[..., :32]).abs().max() < 0.5  # first group: normal range
    assert (rows[..., 32:] - v[..., 32:]).abs().max() < 80 / 15  # within a step of its range
