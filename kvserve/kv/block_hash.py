"""Content hashes of full KV blocks, chained so that one hash names a whole prefix.

Block i's hash covers its parent's hash (block i-1's), its own token ids and the extra keys,
so equal hashes mean equal prefixes, not merely equal blocks:

    tokens:  [ t0 .. t15 | t16 .. t31 | t32 .. t40 ]   block_size 16
    hashes:  h0 = H(None, t0..t15, keys + salt)
             h1 = H(h0,   t16..t31, keys)
             (the partial third block has no hash until it is full)

The hash is sha256 over an unambiguous encoding, never Python's `hash()`: that is salted per
process, and the same key addresses the disk and Redis tiers across processes and restarts.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NamedTuple

from kvserve.request import Request

ExtraKey = str | int | bytes

# Bump when the encoding changes, so stale entries in persistent tiers stop matching.
_HASH_VERSION = b"kvserve-block-hash-v1"
_CACHE_SALT_KEY = "cache_salt"


def hash_block(
    parent: bytes | None, token_ids: Sequence[int], extra_keys: tuple[ExtraKey, ...] = ()
) -> bytes:
    """sha256 digest (32 bytes) of one full block.

    Every field is length-prefixed and every extra key carries a type tag, so no two different
    inputs share an encoding (("ab",) differs from ("a", "b"), 1 from "1", no parent from an
    empty parent).

    Args:
        parent: the previous block's hash, None for the first block.
        token_ids: the block's tokens; each must fit in a signed int32.
        extra_keys: what else decides the block's K/V: model fingerprint, kv dtype, cache salt.

    Raises:
        struct.error: a token id does not fit in int32.
        TypeError: an extra key is not str, int or bytes.
    """
    digest = hashlib.sha256(_HASH_VERSION)
    if parent is None:
        digest.update(b"N")
    else:
        digest.update(b"P" + _length(parent) + parent)
    digest.update(_length(token_ids) + struct.pack(f"<{len(token_ids)}i", *token_ids))
    digest.update(struct.pack("<Q", len(extra_keys)))
    for key in extra_keys:
        digest.update(_encode_key(key))
    return digest.digest()


class BlockHashParams(NamedTuple):
    """What besides token ids decides an engine's block hashes; `Engine.block_hash_params`.

    A router outside the engine computes the hashes the engine will use for a prompt with
    `params.block_hashes(token_ids, cache_salt)` and compares them with the hashes a replica
    announced (KV events), without asking the engine.
    """

    block_size: int
    model_fingerprint: str
    kv_cache_dtype: str

    @property
    def extra_keys(self) -> tuple[ExtraKey, ...]:
        return (self.model_fingerprint, self.kv_cache_dtype)

    def block_hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[bytes]:
        """The hashes of the full blocks of `token_ids`, as the engine computes them."""
        return block_hashes(token_ids, self.block_size, self.extra_keys, cache_salt=cache_salt)


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple[ExtraKey, ...] = (),
    parent: bytes | None = None,
    *,
    cache_salt: str | None = None,
) -> list[bytes]:
    """Hashes of the full blocks of `token_ids`, chained from `parent`. A pure function.

    The trailing partial block has no hash. With `parent` None the chain starts here, and a
    `cache_salt` joins the first block's extra keys only: the chain carries it to every later
    block, so different salts never share a block. With a parent the salt is already in it
    and `cache_salt` is ignored.

    Args:
        token_ids: the tokens after the block named by `parent` (all of them when None).
        block_size: tokens per block, >= 1.
        extra_keys: model fingerprint and kv dtype (see `BlockHashParams`).
        parent: the hash of the block just before `token_ids`, None at the sequence start.
        cache_salt: the request's salt (a tenant's private cache), or None.

    Raises:
        ValueError: block_size < 1.
    """
    if block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        keys = extra_keys
        if parent is None and cache_salt is not None:
            keys = extra_keys + (_CACHE_SALT_KEY, cache_salt)
        parent = hash_block(parent, token_ids[start : start + block_size], keys)
        hashes.append(parent)
    return hashes


def extend_block_hashes(
    request: Request, block_size: int, extra_keys: tuple[ExtraKey, ...] = ()
) -> list[bytes]:
    """Append to `request.block_hashes` the hashes of its newly full blocks (`block_hashes`).

    Only blocks whose tokens are all in `request.all_token_ids` are hashed; hashes already
    there are kept, so calling this every step costs one hash per newly full block. The
    request's `cache_salt` salts its first block.

    Returns:
        request.block_hashes (the same list, extended).
    """
    hashes = request.block_hashes
    num_hashed = len(hashes)
    if (num_hashed + 1) * block_size > request.num_tokens:
        return hashes  # the common decode step: no block newly full
    parent = hashes[-1] if hashes else None
    new_tokens = request.all_token_ids[num_hashed * block_size :]
    hashes.extend(
        block_hashes(new_tokens, block_size, extra_keys, parent, cache_salt=request.cache_salt)
    )
    return hashes


def _length(items: Sequence[object] | bytes) -> bytes:
    return struct.pack("<Q", len(items))


def _encode_key(key: ExtraKey) -> bytes:
    if isinstance(key, bytes):
        return b"b" + _length(key) + key
    if isinstance(key, str):
        data = key.encode("utf-8")
        return b"s" + _length(data) + data
    if isinstance(key, int):  # bool is an int: True encodes as 1
        data = str(int(key)).encode("ascii")
        return b"i" + _length(data) + data
    raise TypeError(f"extra key must be str, int or bytes, got {type(key).__name__}")
