"""Block hashes: exact encoding, chaining, cache salt, and stability across processes."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvserve.kv.block_hash import BlockHashParams, block_hashes, extend_block_hashes, hash_block
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

KEYS = ("model-fingerprint", "float32")


def make_request(token_ids: list[int], cache_salt: str | None = None) -> Request:
    return Request("r", token_ids, SamplingParams(max_tokens=4), cache_salt=cache_salt)


def test_encoding_is_exactly_the_documented_one() -> None:
    parent = bytes(range(32))
    expected = hashlib.sha256(b"kvserve-block-hash-v1")
    expected.update(b"P" + struct.pack("<Q", 32) + parent)
    expected.update(struct.pack("<Q", 3) + struct.pack("<3i", 7, -1, 2**31 - 1))
    expected.update(struct.pack("<Q", 3))
    expected.update(b"s" + struct.pack("<Q", 2) + b"ab")
    expected.update(b"i" + struct.pack("<Q", 2) + b"42")
    expected.update(b"b" + struct.pack("<Q", 1) + b"\x00")
    assert hash_block(parent, [7, -1, 2**31 - 1], ("ab", 42, b"\x00")) == expected.digest()


def test_pinned_digests() -> None:
    # Persistent tiers (disk, Redis) are keyed by these: a change here invalidates them.
    first = hash_block(None, [1, 2, 3, 4], ("model", "float32"))
    assert first.hex() == "dc649a9f03ef3af9e46dc028ee86537045a7c4c53796004e417a66d452f3ab7c"
    second = hash_block(hash_block(None, [1, 2, 3, 4], ()), [5, 6, 7, 8], ())
    assert second.hex() == "32cea02eaf6429dc12121608eb60fc77622c2dc5f196ee98b878e55d03a52bd8"
    assert len(first) == 32


def test_same_hash_in_a_fresh_process() -> None:
    repo_root = Path(__file__).resolve().parents[2]
    code = (
        "from kvserve.kv.block_hash import hash_block\n"
        "p = hash_block(None, [10, 20, 30], ('m', 3, b'x'))\n"
        "print(hash_block(p, [40, 50, 60], ('m', 3, b'x')).hex())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo_root,
        env={"PYTHONPATH": str(repo_root), "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    parent = hash_block(None, [10, 20, 30], ("m", 3, b"x"))
    assert result.stdout.strip() == hash_block(parent, [40, 50, 60], ("m", 3, b"x")).hex()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((None, [1, 2], ("ab",)), (None, [1, 2], ("a", "b"))),
        ((None, [1, 2], (1,)), (None, [1, 2], ("1",))),
        ((None, [1, 2], ("1",)), (None, [1, 2], (b"1",))),
        ((None, [1, 2], ()), (b"", [1, 2], ())),
        ((None, [1, 2], ()), (None, [2, 1], ())),
        ((None, [1, 2], ()), (None, [1, 2, 0], ())),
        ((b"\x01" * 32, [1, 2], ()), (b"\x02" * 32, [1, 2], ())),
    ],
)
def test_different_inputs_never_share_an_encoding(
    a: tuple[bytes | None, list[int], tuple[str | int | bytes, ...]],
    b: tuple[bytes | None, list[int], tuple[str | int | bytes, ...]],
) -> None:
    assert hash_block(*a) != hash_block(*b)


def test_token_id_outside_int32_is_rejected() -> None:
    with pytest.raises(struct.error):
        hash_block(None, [2**31], ())


def test_bad_extra_key_type_is_rejected() -> None:
    with pytest.raises(TypeError, match="extra key"):
        hash_block(None, [1], (1.5,))  # type: ignore[arg-type]


def test_extend_hashes_only_full_blocks_and_chains_them() -> None:
    request = make_request(list(range(10)))
    hashes = extend_block_hashes(request, 4, KEYS)
    h0 = hash_block(None, [0, 1, 2, 3], KEYS)
    h1 = hash_block(h0, [4, 5, 6, 7], KEYS)
    assert hashes == [h0, h1]
    assert hashes is request.block_hashes
    # Two more tokens fill the third block; the first two hashes are kept, not recomputed.
    request.append_output_token(10)
    request.append_output_token(11)
    request.block_hashes[0] = b"kept"
    assert extend_block_hashes(request, 4, KEYS)[1:] == [h1, hash_block(h1, [8, 9, 10, 11], KEYS)]
    assert request.block_hashes[0] == b"kept"


def test_cache_salt_joins_the_first_block_only() -> None:
    request = make_request(list(range(8)), cache_salt="tenant-a")
    h0 = hash_block(None, [0, 1, 2, 3], (*KEYS, "cache_salt", "tenant-a"))
    assert extend_block_hashes(request, 4, KEYS) == [h0, hash_block(h0, [4, 5, 6, 7], KEYS)]
    unsalted = extend_block_hashes(make_request(list(range(8))), 4, KEYS)
    other = extend_block_hashes(make_request(list(range(8)), cache_salt="tenant-b"), 4, KEYS)
    assert len({request.block_hashes[1], unsalted[1], other[1]}) == 3


def test_block_hashes_is_the_chain_of_hash_block_over_full_blocks() -> None:
    h0 = hash_block(None, [0, 1, 2, 3], KEYS)
    h1 = hash_block(h0, [4, 5, 6, 7], KEYS)
    assert block_hashes(list(range(11)), 4, KEYS) == [h0, h1]  # 8..10: partial, no hash
    assert block_hashes([1, 2, 3], 4, KEYS) == []
    # A chain continued from a parent equals the whole chain.
    assert block_hashes(list(range(4, 8)), 4, KEYS, parent=h0) == [h1]


def test_block_hashes_salt_only_the_first_block_of_a_chain() -> None:
    salted = (*KEYS, "cache_salt", "t")
    h0 = hash_block(None, [0, 1, 2, 3], salted)
    expected = [h0, hash_block(h0, [4, 5, 6, 7], KEYS)]
    assert block_hashes(list(range(8)), 4, KEYS, cache_salt="t") == expected
    # With a parent the salt is already in the chain: ignored.
    assert block_hashes(list(range(4, 8)), 4, KEYS, h0, cache_salt="other") == expected[1:]


def test_block_hashes_rejects_a_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2], 0)


def test_hash_params_give_a_router_the_request_hashes() -> None:
    params = BlockHashParams(block_size=4, model_fingerprint="fp", kv_cache_dtype="int8")
    assert params.extra_keys == ("fp", "int8")
    request = make_request(list(range(10)), cache_salt="tenant-a")
    expected = extend_block_hashes(request, params.block_size, params.extra_keys)
    assert params.block_hashes(list(range(10)), cache_salt="tenant-a") == expected
    assert params.block_hashes(list(range(10))) != expected
