"""One KV block <-> bytes, for every store below the pool: a header, the raw tensors, a checksum.

    offset  field (little-endian)
    0       magic b"KVSB", format version uint16
    6       key: uint16 length + bytes (the block hash the entry is stored under)
    ..      params: block_size uint32, model fingerprint and kv dtype: uint16 length + utf-8
    ..      layout: num_layers uint16; per layer num_tensors uint8; per tensor a dtype code
            uint8 (0: no tensor), and if present ndim uint8 + ndim uint32 dims
    ..      body: each present tensor's bytes, layer by layer, in C order
    end-32  checksum: sha256 of everything before it, or HMAC-SHA256 keyed by the secret

Decoding rebuilds the header it expects (key, params, layout) and compares bytes, so an entry of
another version, model, dtype, block size or key, or of another shape, is a miss; so is a bad
checksum (corrupt, truncated) or signature (forged, or written with another secret).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import NamedTuple

import torch

from kvserve.kv.kv_cache import BlockData

MAGIC = b"KVSB"
FORMAT_VERSION = 1
CHECKSUM_BYTES = 32

# Codes written in the header; never renumber (bump FORMAT_VERSION instead).
_DTYPE_CODES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "bfloat16": 3,
    "float8_e4m3fn": 4,
    "int8": 5,
    "uint8": 6,  # int4, two values a byte
}
_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in _DTYPE_CODES}

TensorLayout = tuple[tuple[int, ...], str] | None  # (shape, dtype name), None: no tensor


class BlockLayout(NamedTuple):
    """The shapes and dtypes of one block's tensors: per layer, per tensor (k, v, scales)."""

    layers: tuple[tuple[TensorLayout, ...], ...]

    @classmethod
    def of(cls, data: BlockData) -> BlockLayout:
        """The layout of `data` (e.g. a block `read_block` returned)."""
        return cls(
            tuple(
                tuple(None if t is None else (tuple(t.shape), _dtype_name(t.dtype)) for t in layer)
                for layer in data
            )
        )

    @property
    def num_bytes(self) -> int:
        """Bytes of all the tensors (the body of an entry)."""
        return sum(_num_bytes(tensor) for layer in self.layers for tensor in layer)


def encode_block(
    data: BlockData, key: bytes, params: tuple[int, str, str], secret: bytes | None = None
) -> bytes:
    """The bytes a store keeps for one block.

    Args:
        data: per layer, the block's tensors (k, v, scales), None where the cache has none.
        key: the block hash the entry is stored under.
        params: (block_size, model_fingerprint, kv_cache_dtype): `BlockHashParams`.
        secret: sign with HMAC-SHA256 under this key instead of a plain sha256.

    Raises:
        ValueError: a tensor's dtype has no code in this format.
    """
    parts = [_header(key, params, BlockLayout.of(data))]
    for layer in data:
        for tensor in layer:
            if tensor is not None:
                parts.append(_tensor_bytes(tensor))
    unsigned = b"".join(parts)
    return unsigned + _checksum(unsigned, secret)


def decode_block(
    payload: bytes,
    key: bytes,
    params: tuple[int, str, str],
    layout: BlockLayout,
    secret: bytes | None = None,
) -> BlockData | None:
    """The block in `payload` if it is exactly what the caller expects, else None.

    Args:
        payload: what a store returned for `key`.
        key, params, secret: as given to `encode_block`.
        layout: the shapes and dtypes the cache's blocks have (`BlockLayout.of`).

    Returns:
        CPU tensors, or None for anything wrong (length, header, checksum); never raises for a
        bad payload.

    Raises:
        ValueError: `layout` names a dtype this format has no code for (a caller's bug).
    """
    header = _header(key, params, layout)
    body_end = len(header) + layout.num_bytes
    if len(payload) != body_end + CHECKSUM_BYTES or not payload.startswith(header):
        return None
    view = memoryview(payload)
    if not hmac.compare_digest(_checksum(view[:body_end], secret), view[body_end:]):
        return None
    offset = len(header)
    data: BlockData = []
    for layer in layout.layers:
        tensors: list[torch.Tensor | None] = []
        for tensor in layer:
            if tensor is None:
                tensors.append(None)
                continue
            num_bytes = _num_bytes(tensor)
            tensors.append(_tensor_from(view[offset : offset + num_bytes], tensor))
            offset += num_bytes
        data.append(tuple(tensors))
    return data


def _header(key: bytes, params: tuple[int, str, str], layout: BlockLayout) -> bytes:
    block_size, model_fingerprint, kv_cache_dtype = params
    parts = [MAGIC, struct.pack("<H", FORMAT_VERSION), _sized(key)]
    parts += [struct.pack("<I", block_size), _sized(model_fingerprint.encode())]
    parts += [_sized(kv_cache_dtype.encode()), struct.pack("<H", len(layout.layers))]
    for layer in layout.layers:
        parts.append(struct.pack("<B", len(layer)))
        for tensor in layer:
            parts.append(_tensor_header(tensor))
    return b"".join(parts)


def _tensor_header(tensor: TensorLayout) -> bytes:
    if tensor is None:
        return b"\x00"
    shape, dtype = tensor
    _torch_dtype(dtype)  # raises for a dtype without a code
    return struct.pack(f"<BB{len(shape)}I", _DTYPE_CODES[dtype], len(shape), *shape)


def _sized(field: bytes) -> bytes:
    return struct.pack("<H", len(field)) + field


def _checksum(data: bytes | memoryview, secret: bytes | None) -> bytes:
    if secret is None:
        return hashlib.sha256(data).digest()
    return hmac.new(secret, data, hashlib.sha256).digest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _num_bytes(tensor: TensorLayout) -> int:
    if tensor is None:
        return 0
    shape, dtype = tensor
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * _torch_dtype(dtype).itemsize


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} cannot be serialized; one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (num_bytes,)
    return raw.numpy().tobytes()


def _tensor_from(raw: memoryview, layout: tuple[tuple[int, ...], str]) -> torch.Tensor:
    """A fresh tensor with `raw`'s bytes (a copy: stores hand back immutable bytes)."""
    shape, dtype = layout
    if len(raw) == 0:
        return torch.empty(shape, dtype=_torch_dtype(dtype))
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # (num_bytes,)
    return flat.view(_torch_dtype(dtype)).reshape(shape)


__all__ = [
    "BlockData",
    "BlockLayout",
    "CHECKSUM_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "decode_block",
    "encode_block",
]
