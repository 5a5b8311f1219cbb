"""`kvserve kv-size`: the KV cache size of a model (a preset or a local checkpoint), and what
a memory budget holds (kv/planner.py does the arithmetic, kv/sizing.py the bytes)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvserve.kv.planner import PRESETS, KVPlan, ModelShape, plan_kv


def add_subcommand(commands: Any) -> None:
    kv_size = commands.add_parser("kv-size", help="KV cache size and capacity planner")
    kv_size.add_argument("--model", default=None, help="HF folder or .gguf file")
    kv_size.add_argument("--preset", default=None,
                         help="Llama-2-7B, Llama-2-70B, Llama-3-8B, Mistral-7B, Qwen2-7B, "
                              "SmolLM2-135M")  # fmt: skip
    kv_size.add_argument("--batch-size", type=int, default=1)
    kv_size.add_argument("--seq-len", type=int, default=2048)
    kv_size.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="auto (= --dtype), float32, float16, bfloat16, fp8_e4m3, int8, int4",
    )
    kv_size.add_argument("--dtype", default="float16", help="the weights' dtype (and auto KV)")
    kv_size.add_argument("--block-size", type=int, default=16, help="int4 keys: scales a block")
    kv_size.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="GiB for weights + KV: how many tokens / sequences fit",
    )
    kv_size.add_argument("--json", action="store_true", help="machine-readable output")
    kv_size.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    shape = _shape(args)
    plan = plan_kv(shape, args.batch_size, args.seq_len, args.kv_cache_dtype, args.dtype,
                   args.memory_gb, args.block_size)  # fmt: skip
    if args.json:
        print(json.dumps({"shape": shape.__dict__, "plan": plan.as_dict()}, indent=2))
        return 0
    rows = _rows(shape, plan, args)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:>{width}}  {value}")
    return 0


def _shape(args: argparse.Namespace) -> ModelShape:
    if (args.model is None) == (args.preset is None):
        raise ValueError("model / preset: give exactly one (--model PATH or --preset NAME)")
    if args.preset is None:
        from kvserve.model_shape import model_shape

        return model_shape(args.model)
    if args.preset not in PRESETS:
        raise ValueError(f"preset: must be one of {', '.join(PRESETS)}; got {args.preset!r}")
    return PRESETS[args.preset]


def _rows(shape: ModelShape, plan: KVPlan, args: argparse.Namespace) -> list[tuple[str, str]]:
    windows = sorted({w for w in shape.layer_windows if w is not None})
    rows = [
        ("model", f"{shape.name}: {shape.num_layers} layers, {shape.num_attention_heads} query "
                  f"heads, {shape.num_kv_heads} KV heads, head_dim {shape.head_dim}"),
        ("sliding window", ", ".join(map(str, windows)) or "none"),
        ("KV dtype", f"{args.kv_cache_dtype} (weights {args.dtype})"),
        ("bytes per token", f"{plan.bytes_per_token:,} = data {plan.data_bytes_per_token:,}"
                            f" + scales {plan.scale_bytes_per_token:,}"),
        ("tokens held per sequence", f"{plan.tokens_held_per_seq:,} of {plan.seq_len:,}"),
        ("KV per sequence", _bytes(plan.kv_bytes_per_seq)),
        (f"KV for batch {plan.batch_size}", _bytes(plan.kv_bytes)),
        ("weights", _bytes(plan.weights_bytes)),
    ]  # fmt: skip
    if plan.memory_bytes is not None:
        rows += [
            ("memory", _bytes(plan.memory_bytes)),
            ("free after the weights", _bytes(plan.free_bytes or 0)),
            ("tokens that fit", f"{plan.max_tokens:,}"),
            (f"sequences of {plan.seq_len:,} that fit", f"{plan.max_seqs:,}"),
        ]  # fmt: skip
    return rows


def _bytes(count: int) -> str:
    return f"{count:,} bytes ({count / (1 << 30):.3f} GiB)"
