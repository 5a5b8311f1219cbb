"""KV size arithmetic: the seeds' formula, pinned on Llama-2-7B and SmolLM2-135M."""

from __future__ import annotations

import pytest

from kvserve.kv.sizing import (
    KV_DTYPE_BYTES,
    kv_bytes_per_token,
    kv_cache_bytes,
    num_blocks_for_bytes,
)


def test_llama2_7b_fp16_2048_tokens_is_one_gib() -> None:
    assert kv_cache_bytes(1, 2048, 32, 32, 128, 2) == 1_073_741_824
    assert kv_bytes_per_token(32, 32, 128, 2) == 524_288


def test_cache_bytes_scale_with_batch_and_seq() -> None:
    one = kv_cache_bytes(1, 2048, 32, 32, 128, 2)
    assert kv_cache_bytes(4, 2048, 32, 32, 128, 2) == 4 * one
    assert kv_cache_bytes(1, 50, 32, 32, 128, 2) == 50 * kv_bytes_per_token(32, 32, 128, 2)


def test_smollm2_135m_gqa_per_token() -> None:
    # 30 layers, 3 KV heads (GQA, not the 9 query heads), head_dim 64.
    assert kv_bytes_per_token(30, 3, 64, 4) == 46_080
    assert kv_bytes_per_token(30, 3, 64, KV_DTYPE_BYTES["int4"]) == 5_760


def test_sub_byte_dtype_rounds_up_to_whole_bytes() -> None:
    assert kv_bytes_per_token(1, 1, 3, 0.5) == 3
    assert kv_cache_bytes(1, 1, 1, 1, 3, 0.5) == 3


def test_num_blocks_rounds_down() -> None:
    assert num_blocks_for_bytes(1 << 30, 16, 46_080) == 1456
    assert num_blocks_for_bytes(16 * 100 - 1, 16, 100) == 0
    assert num_blocks_for_bytes(16 * 100, 16, 100) == 1


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: kv_bytes_per_token(0, 1, 1, 2), "num_layers"),
        (lambda: kv_bytes_per_token(1, 1, 1, 0), "dtype_bytes"),
        (lambda: kv_cache_bytes(0, 1, 1, 1, 1, 2), "batch_size"),
        (lambda: kv_cache_bytes(1, -5, 1, 1, 1, 2), "seq_len"),
        (lambda: num_blocks_for_bytes(100, 0, 4), "block_size"),
        (lambda: num_blocks_for_bytes(100, 4, True), "bytes_per_token"),
    ],
)
def test_non_positive_arguments_name_the_field(call: object, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()  # type: ignore[operator]
