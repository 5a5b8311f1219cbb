"""`kvserve eval ppl`: perplexity of a text with the KV cache in `--kv-cache-dtype`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

from kvserve.config import EngineConfig
from kvserve.eval.perplexity import PplConfig, perplexity
from kvserve.eval.text import default_text, read_text


def add_subcommand(commands: Any) -> None:
    """`kvserve eval ppl`, with every engine flag (`--model`, `--kv-cache-dtype`, ...)."""
    evaluate = commands.add_parser("eval", help="accuracy evaluations")
    evals = evaluate.add_subparsers(dest="eval_command", required=True)
    ppl = evals.add_parser(
        "ppl",
        help="perplexity with the KV cache in --kv-cache-dtype, scored through the engine",
    )
    ppl.add_argument("--text-file", default=None, help="UTF-8 text (default: Genesis, KJV)")
    ppl.add_argument("--window-len", type=int, default=512, help="tokens per window")
    ppl.add_argument("--num-windows", type=int, default=16)
    ppl.add_argument("--batch-size", type=int, default=16, help="windows run side by side")
    ppl.add_argument("--output-json", default=None, help="write the result here")
    EngineConfig.add_cli_args(ppl)
    ppl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvserve.llm import LLM

    config = PplConfig(
        window_len=args.window_len, num_windows=args.num_windows, batch_size=args.batch_size
    )
    text = default_text() if args.text_file is None else read_text(args.text_file)
    llm = LLM(**dataclasses.asdict(EngineConfig.from_cli_args(args)))
    if llm.tokenizer is None:
        raise ValueError("model: has no tokenizer, so it cannot read a text")
    token_ids = llm.tokenizer.encode(text, add_special_tokens=False)
    start = time.perf_counter()
    result = perplexity(llm, token_ids, config)
    result["elapsed_time"] = time.perf_counter() - start
    del result["predictions"]
    print(
        f"perplexity {result['perplexity']:.4f} (kv_cache_dtype {result['kv_cache_dtype']}, "
        f"{result['num_scored_tokens']} tokens in {result['num_windows']} windows of "
        f"{config.window_len} through the engine's prefill; {result['elapsed_time']:.1f} s)"
    )
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2, allow_nan=False)
    return 0
