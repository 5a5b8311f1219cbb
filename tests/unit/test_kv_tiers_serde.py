"""Serialization of one KV block for the tiers: exact bytes, exact round trips, and every
wrong payload decoding to None (a miss), never an exception."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
import torch

from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_cache import BlockData
from kvserve.kv.tiers.serde import BlockLayout, decode_block, encode_block

KEY = bytes(range(32))
PARAMS = (16, "fingerprint", "auto")


def make_block(dtype: torch.dtype, num_layers: int = 2, scales: bool = False) -> BlockData:
    """k, v of shape (block_size 4, kv_heads 2, head_dim 8), then k/v scales or None."""
    gen = torch.Generator().manual_seed(0)
    data: BlockData = []
    for _ in range(num_layers):
        if dtype.is_floating_point:
            k = torch.randn(4, 2, 8, generator=gen).to(dtype)  # (4, 2, 8)
            v = torch.randn(4, 2, 8, generator=gen).to(dtype)  # (4, 2, 8)
        else:
            info = torch.iinfo(dtype)
            k = torch.randint(info.min, info.max + 1, (4, 2, 8), generator=gen, dtype=dtype)
            v = torch.randint(info.min, info.max + 1, (4, 2, 8), generator=gen, dtype=dtype)
        k_scale = torch.rand(4, 2, generator=gen) if scales else None  # (4, 2)
        v_scale = torch.rand(4, 2, generator=gen) if scales else None  # (4, 2)
        data.append((k, v, k_scale, v_scale))
    return data


def assert_same(got: BlockData | None, want: BlockData) -> None:
    assert got is not None
    assert len(got) == len(want)
    for got_layer, want_layer in zip(got, want, strict=True):
        assert len(got_layer) == len(want_layer)
        for a, b in zip(got_layer, want_layer, strict=True):
            if b is None:
                assert a is None
                continue
            assert a is not None
            assert a.dtype == b.dtype and a.shape == b.shape
            # Bytes, not values: exact for every dtype, NaN and -0.0 included.
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_header_bytes_are_pinned() -> None:
    data: BlockData = [(torch.tensor([[1.0, 2.0]]), None)]  # k: (1, 2) float32, no v
    payload = encode_block(data, bytes([0, 1, 2, 3]), (16, "fp", "auto"))
    header = (
        b"KVSB\x01\x00"  # magic, version 1
        b"\x04\x00\x00\x01\x02\x03"  # key
        b"\x10\x00\x00\x00\x02\x00fp\x04\x00auto"  # block_size 16, fingerprint, kv dtype
        b"\x01\x00\x02"  # 1 layer of 2 tensors
        b"\x01\x02\x01\x00\x00\x00\x02\x00\x00\x00"  # float32, ndim 2, (1, 2)
        b"\x00"  # no tensor
    )
    body = b"\x00\x00\x80\x3f\x00\x00\x00\x40"  # 1.0, 2.0
    assert len(payload) == 40 + 8 + 32
    assert payload[:48] == header + body
    assert payload[48:] == hashlib.sha256(header + body).digest()


def test_signed_checksum_is_hmac_sha256() -> None:
    data: BlockData = [(torch.tensor([[1.0, 2.0]]), None)]
    payload = encode_block(data, KEY, PARAMS, secret=b"s3cret")
    unsigned = payload[:-32]
    assert payload[-32:] == hmac.new(b"s3cret", unsigned, hashlib.sha256).digest()
    assert unsigned == encode_block(data, KEY, PARAMS)[:-32]


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.uint8],
)
def test_round_trip_is_exact_for_every_kv_dtype(dtype: torch.dtype) -> None:
    data = make_block(dtype, scales=dtype in (torch.int8, torch.uint8))
    payload = encode_block(data, KEY, PARAMS)
    assert_same(decode_block(payload, KEY, PARAMS, BlockLayout.of(data)), data)


def test_round_trip_keeps_special_float_values() -> None:
    k = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])  # (4,) subnormal included
    data: BlockData = [(k, k.to(torch.bfloat16))]
    payload = encode_block(data, KEY, PARAMS)
    assert_same(decode_block(payload, KEY, PARAMS, BlockLayout.of(data)), data)


def test_round_trip_of_an_empty_tensor_and_a_non_contiguous_one() -> None:
    wide = torch.arange(16, dtype=torch.float32).reshape(4, 4)  # (4, 4)
    data: BlockData = [(torch.empty(4, 0), wide.t())]  # (4, 0), (4, 4) transposed
    payload = encode_block(data, KEY, PARAMS)
    assert_same(decode_block(payload, KEY, PARAMS, BlockLayout.of(data)), data)


def test_layout_of_a_block() -> None:
    layout = BlockLayout.of(make_block(torch.int8, num_layers=1, scales=True))
    assert layout == BlockLayout(
        (((((4, 2, 8), "int8"), ((4, 2, 8), "int8"), ((4, 2), "float32"), ((4, 2), "float32"))),)
    )
    assert layout.num_bytes == 2 * 64 + 2 * 8 * 4


def test_decoded_tensors_are_writable_copies() -> None:
    data = make_block(torch.float32, num_layers=1)
    payload = encode_block(data, KEY, PARAMS)
    got = decode_block(payload, KEY, PARAMS, BlockLayout.of(data))
    assert got is not None and got[0][0] is not None
    got[0][0].zero_()
    assert_same(decode_block(payload, KEY, PARAMS, BlockLayout.of(data)), data)


def test_params_may_be_block_hash_params() -> None:
    data = make_block(torch.float16)
    payload = encode_block(data, KEY, BlockHashParams(*PARAMS))
    assert payload == encode_block(data, KEY, PARAMS)


def test_a_dtype_without_a_code_is_refused() -> None:
    with pytest.raises(ValueError, match="float64"):
        encode_block([(torch.zeros(2, dtype=torch.float64),)], KEY, PARAMS)


@pytest.fixture
def block() -> tuple[BlockData, bytes, BlockLayout]:
    data = make_block(torch.int8, scales=True)
    return data, encode_block(data, KEY, PARAMS), BlockLayout.of(data)


def test_truncated_or_extended_payloads_are_misses(block: tuple[BlockData, bytes, BlockLayout]):
    _, payload, layout = block
    for bad in (b"", payload[:4], payload[:60], payload[:-32], payload[:-1], payload + b"\x00"):
        assert decode_block(bad, KEY, PARAMS, layout) is None


def test_a_flipped_byte_anywhere_is_a_miss(block: tuple[BlockData, bytes, BlockLayout]) -> None:
    _, payload, layout = block
    for index in (0, 5, 10, 50, len(payload) // 2, len(payload) - 33, len(payload) - 1):
        corrupt = bytearray(payload)
        corrupt[index] ^= 0x01
        assert decode_block(bytes(corrupt), KEY, PARAMS, layout) is None


def test_another_format_version_is_a_miss(block: tuple[BlockData, bytes, BlockLayout]) -> None:
    _, payload, layout = block
    unsigned = payload[:4] + struct.pack("<H", 2) + payload[6:-32]
    other_version = unsigned + hashlib.sha256(unsigned).digest()  # a valid checksum
    assert decode_block(other_version, KEY, PARAMS, layout) is None


def test_other_params_key_or_layout_are_misses(block: tuple[BlockData, bytes, BlockLayout]):
    data, payload, layout = block
    assert decode_block(payload, KEY, PARAMS, layout) is not None
    for params in ((32, "fingerprint", "auto"), (16, "other", "auto"), (16, "fingerprint", "int4")):
        assert decode_block(payload, KEY, params, layout) is None
    assert decode_block(payload, bytes(32), PARAMS, layout) is None  # stored under another key
    fewer_layers = BlockLayout.of(data[:1])
    same_bytes_as_uint8 = BlockLayout.of(
        [tuple(None if t is None else t.view(torch.uint8) for t in layer) for layer in data]
    )
    other_shape = BlockLayout.of(make_block(torch.int8, num_layers=2, scales=False))
    for other in (fewer_layers, same_bytes_as_uint8, other_shape):
        assert decode_block(payload, KEY, PARAMS, other) is None


def test_a_signed_entry_needs_the_same_secret() -> None:
    data = make_block(torch.float32)
    layout = BlockLayout.of(data)
    signed = encode_block(data, KEY, PARAMS, secret=b"tenant-a")
    assert_same(decode_block(signed, KEY, PARAMS, layout, secret=b"tenant-a"), data)
    assert decode_block(signed, KEY, PARAMS, layout, secret=b"tenant-b") is None
    assert decode_block(signed, KEY, PARAMS, layout) is None
    unsigned = encode_block(data, KEY, PARAMS)
    assert decode_block(unsigned, KEY, PARAMS, layout, secret=b"tenant-a") is None


def test_a_forged_entry_with_a_fresh_sha256_is_refused_when_signed() -> None:
    data = make_block(torch.float32)
    layout = BlockLayout.of(data)
    body = bytearray(encode_block(data, KEY, PARAMS)[:-32])
    body[-1] ^= 0xFF  # change a value, then fix up the plain checksum
    forged = bytes(body) + hashlib.sha256(body).digest()
    assert decode_block(forged, KEY, PARAMS, layout) is not None  # sha256 only detects accidents
    assert decode_block(forged, KEY, PARAMS, layout, secret=b"tenant-a") is None
