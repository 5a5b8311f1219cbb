"""`kvserve kv-size`: every preset against hand-computed bytes, windows, scales, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvserve.cli import main
from kvserve.kv.planner import GIB, PRESETS, ModelShape, plan_kv

# fp16, batch 1, 2,048 tokens: 2 x layers x kv_heads x head_dim x 2 bytes x 2048, by hand.
HAND_COMPUTED = {
    "Llama-2-7B": (2 * 32 * 32 * 128 * 2, 1_073_741_824),
    "Llama-2-70B": (2 * 80 * 8 * 128 * 2, 671_088_640),
    "Llama-3-8B": (2 * 32 * 8 * 128 * 2, 268_435_456),
    "Mistral-7B": (2 * 32 * 8 * 128 * 2, 268_435_456),  # 2,048 < its 4,096 window
    "Qwen2-7B": (2 * 28 * 4 * 128 * 2, 117_440_512),
    "SmolLM2-135M": (2 * 30 * 3 * 64 * 2, 47_185_920),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_matches_the_hand_computed_formula(name: str) -> None:
    per_token, total = HAND_COMPUTED[name]
    plan = plan_kv(PRESETS[name], batch_size=1, seq_len=2048, kv_cache_dtype="float16")
    assert plan.bytes_per_token == per_token
    assert plan.kv_bytes == total == per_token * 2048
    assert plan_kv(PRESETS[name], batch_size=3, seq_len=2048).kv_bytes == 3 * total  # auto=fp16


def test_sliding_window_caps_what_a_sequence_holds() -> None:
    mistral = PRESETS["Mistral-7B"]
    long = plan_kv(mistral, seq_len=32768)
    assert long.tokens_held_per_seq == 4096
    assert long.kv_bytes == 4096 * 131_072  # not 32,768 x 131,072
    mixed = ModelShape("half", 2, 4, 2, 8, 1000, 4096, (None, 100))
    plan = plan_kv(mixed, seq_len=1000, kv_cache_dtype="float32")
    assert plan.kv_bytes == (1000 + 100) * (2 * 2 * 8 * 4)  # per layer: 2 x kv x hd x 4


def test_quantized_dtypes_count_their_scales() -> None:
    llama = PRESETS["Llama-2-7B"]
    int8 = plan_kv(llama, kv_cache_dtype="int8")
    assert int8.data_bytes_per_token == 2 * 32 * 32 * 128
    assert int8.scale_bytes_per_token == 2 * 32 * 32 * 4  # fp32 per token per KV head
    int4 = plan_kv(llama, kv_cache_dtype="int4")  # blocks of 16 tokens
    assert int4.data_bytes_per_token == 2 * 32 * 32 * 128 // 2
    # fp16 scale + zero: keys per channel per 16-token block, values per 32 channels
    assert int4.scale_bytes_per_token == 32 * 32 * (4 * 128 // 16 + 4 * 128 // 32)
    assert int4.kv_bytes == 2048 * (int4.data_bytes_per_token + int4.scale_bytes_per_token)
    int4_32 = plan_kv(llama, kv_cache_dtype="int4", block_size=32)
    assert int4_32.scale_bytes_per_token == 2 * 32 * 32 * 128 * 4 // 32  # one pair per 32
    assert plan_kv(llama, kv_cache_dtype="fp8_e4m3").bytes_per_token == 2 * 32 * 32 * 128


def test_memory_budget_is_what_the_weights_leave() -> None:
    plan = plan_kv(PRESETS["Llama-2-7B"], seq_len=4096, memory_gb=24)
    assert plan.weights_bytes == 6_738_415_616 * 2
    assert plan.free_bytes == 24 * GIB - plan.weights_bytes
    assert plan.max_tokens == plan.free_bytes // 524_288
    assert plan.max_seqs == plan.free_bytes // (4096 * 524_288)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"seq_len": -5}, "seq_len"),
        ({"kv_cache_dtype": "int3"}, "kv_cache_dtype"),
        ({"model_dtype": "int8"}, "dtype"),
        ({"memory_gb": 1.0}, "memory_gb: 1 GiB does not hold the weights"),
        ({"memory_gb": -2.0}, "memory_gb"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        plan_kv(PRESETS["Llama-2-7B"], **kwargs)


def test_cli_prints_the_seeds_figure_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-size", "--preset", "Llama-2-7B", "--batch-size", "1", "--seq-len", "2048",
                 "--kv-cache-dtype", "float16"]) == 0  # fmt: skip
    assert "1,073,741,824 bytes" in capsys.readouterr().out
    assert main(["kv-size", "--preset", "Qwen2-7B", "--memory-gb", "40", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["plan"]["kv_bytes"] == 117_440_512 and record["plan"]["max_seqs"] > 0
    assert main(["kv-size", "--preset", "GPT-5"]) == 2
    assert "preset: must be one of Llama-2-7B" in capsys.readouterr().err
    assert main(["kv-size"]) == 2
    assert "give exactly one" in capsys.readouterr().err


def test_local_model_shape_reads_config_and_parameter_count(
    make_tiny_checkpoint: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    folder = make_tiny_checkpoint("mistral", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    assert main(["kv-size", "--model", str(folder), "--seq-len", "64", "--json",
                 "--kv-cache-dtype", "float32"]) == 0  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    kv_heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_layer = 2 * kv_heads * head_dim * 4
    held = min(64, config["sliding_window"])
    assert record["shape"]["num_params"] == sum(t.numel() for t in tensors.values())
    assert record["plan"]["kv_bytes"] == config["num_hidden_layers"] * held * per_layer
