"""KV size arithmetic: the seeds' formula, pinned on Llama-2-7B and SmolLM2-135M, and the
scales of quantized dtypes, equal to what kv/quant.py allocates."""

from __future__ import annotations

import pytest
import torch

from kvserve.kv import quant
from kvserve.kv.sizing import (
    KVBytes,
    kv_bytes_per_token,
    kv_dtype_name,
    num_blocks_for_bytes,
    tokens_held,
)


def test_llama2_7b_fp16_2048_tokens_is_one_gib() -> None:
    per_token = kv_bytes_per_token(32, 32, 128, "float16")
    assert per_token == KVBytes(data=524_288, scales=0)
    assert 2048 * per_token.total == 1_073_741_824


def test_smollm2_135m_gqa_per_token() -> None:
    # 30 layers, 3 KV heads (GQA, not the 9 query heads), head_dim 64.
    assert kv_bytes_per_token(30, 3, 64, "float32").total == 46_080
    # int8: a float32 scale per token per KV head, K and V: 2 x 30 x 3 x 4 = 720
    assert kv_bytes_per_token(30, 3, 64, "int8") == KVBytes(data=11_520, scales=720)
    # int4: 30 x 3 x (4 x 64 / 16 keys + 4 x 64 / 32 values) = 2_160
    assert kv_bytes_per_token(30, 3, 64, "int4") == KVBytes(data=5_760, scales=2_160)
    assert kv_bytes_per_token(30, 3, 64, "int4", block_size=64).scales == 30 * 3 * (4 + 8)


def test_sub_byte_dtype_rounds_up_to_whole_bytes() -> None:
    assert kv_bytes_per_token(1, 1, 3, "int4").data == 3


def test_auto_is_the_model_dtype() -> None:
    assert kv_dtype_name("auto", "bfloat16") == "bfloat16"
    assert kv_dtype_name("int8", "float32") == "int8"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_dtype_name("int3", "float32")


def test_a_sliding_window_caps_the_tokens_a_layer_holds() -> None:
    assert tokens_held(100, [None, 64, 128]) == [100, 64, 100]


@pytest.mark.parametrize("kv_dtype", ["float32", "float16", "bfloat16", "fp8_e4m3", "int8", "int4"])
@pytest.mark.parametrize("block_size", [4, 16, 32])
def test_bytes_per_token_equal_what_quant_allocates(kv_dtype: str, block_size: int) -> None:
    """The one formula against the tensors of one layer (data and scales) over its slots."""
    num_blocks, kv_heads, head_dim = 3, 3, 64
    dtype = quant.storage_dtype(kv_dtype, torch.float32)
    layer = quant.allocate_layer(
        num_blocks, block_size, kv_heads, head_dim, dtype, torch.device("cpu")
    )
    allocated = sum(t.nbytes for t in layer if t is not None)
    expected = kv_bytes_per_token(1, kv_heads, head_dim, kv_dtype, block_size)
    assert allocated == num_blocks * block_size * expected.total


def test_num_blocks_rounds_down() -> None:
    assert num_blocks_for_bytes(1 << 30, 16, 46_080) == 1456
    assert num_blocks_for_bytes(16 * 100 - 1, 16, 100) == 0
    assert num_blocks_for_bytes(16 * 100, 16, 100) == 1


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: kv_bytes_per_token(0, 1, 1, "float16"), "num_layers"),
        (lambda: kv_bytes_per_token(1, 1, 1, "float16", block_size=0), "block_size"),
        (lambda: kv_bytes_per_token(1, 1, 1, "auto"), "kv_cache_dtype"),
        (lambda: num_blocks_for_bytes(100, 0, 4), "block_size"),
        (lambda: num_blocks_for_bytes(100, 4, True), "bytes_per_token"),
    ],
)
def test_bad_arguments_name_the_field(call: object, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()  # type: ignore[operator]
