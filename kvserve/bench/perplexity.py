"""`kvserve eval ppl`: perplexity with the KV cache in a given dtype, served the way requests are.

The text's tokens are cut into windows of `window_len`. Each window goes through the paged
cache as a request would: its first `prefill_len` tokens in prefill chunks of `chunk_len`
(each chunk attends to the earlier chunks' K/V *as stored*, quantized), the rest one token a
step as decodes (teacher-forced: the true next token, not a sampled one). Every position's
logits score the token after it, so quantization error accumulates over the window exactly as
it would while serving. Windows run `batch_size` at a time, so decode steps are batched.

    window:  [ chunk | chunk | d d d d ... d ]   perplexity = exp(mean NLL over all
              prefill_len      window_len - prefill_len   predicted positions)

The default text is the King James Bible (public domain) from Debian's `bible-kjv` packages,
read through their `bible` program; `make eval-deps` installs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvserve.engine.scheduler_output import ScheduledRequest
from kvserve.sampling_params import SamplingParams

DEFAULT_PASSAGE = "Ge1:1-50:26"  # the book of Genesis, ~50k tokens
_VERSE_REF = re.compile(r"^\S+?\d+:\d+\s+", re.MULTILINE)


@dataclass(frozen=True)
class PplConfig:
    window_len: int = 512
    prefill_len: int = 256
    chunk_len: int = 128
    num_windows: int = 16
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("window_len", "chunk_len", "num_windows", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.window_len < 2:
            raise ValueError(f"window_len: must be at least 2, got {self.window_len}")
        if not 1 <= self.prefill_len <= self.window_len:
            raise ValueError(
                f"prefill_len: must be in [1, window_len={self.window_len}], "
                f"got {self.prefill_len!r}"
            )


def add_subcommand(
    commands: Any, add_engine_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    """`kvserve eval ppl`, with every engine flag (`--model`, `--kv-cache-dtype`, ...)."""
    evaluate = commands.add_parser("eval", help="accuracy evaluations")
    evals = evaluate.add_subparsers(dest="eval_command", required=True)
    ppl = evals.add_parser(
        "ppl",
        help="perplexity with the KV cache in --kv-cache-dtype, through prefill chunks + decode",
    )
    ppl.add_argument("--text-file", default=None, help="UTF-8 text (default: Genesis, KJV)")
    ppl.add_argument("--window-len", type=int, default=512, help="tokens per window")
    ppl.add_argument("--prefill-len", type=int, default=256, help="tokens prefilled, then decodes")
    ppl.add_argument("--chunk-len", type=int, default=128, help="prefill chunk size")
    ppl.add_argument("--num-windows", type=int, default=16)
    ppl.add_argument("--batch-size", type=int, default=16, help="windows run side by side")
    ppl.add_argument("--output-json", default=None, help="write the result here")
    add_engine_args(ppl)
    ppl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvserve.cli import engine_config_from_args
    from kvserve.llm import LLM

    config = PplConfig(
        window_len=args.window_len,
        prefill_len=args.prefill_len,
        chunk_len=args.chunk_len,
        num_windows=args.num_windows,
        batch_size=args.batch_size,
    )
    text = default_text() if args.text_file is None else read_text(args.text_file)
    llm = LLM(**dataclasses.asdict(engine_config_from_args(args)))
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
        f"{config.window_len}: {config.prefill_len} prefilled in chunks of {config.chunk_len}, "
        f"the rest decoded; {result['elapsed_time']:.1f} s)"
    )
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2, allow_nan=False)
    return 0


def read_text(path: str) -> str:
    """A UTF-8 text file; ValueError naming `text_file` when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as error:
        raise ValueError(f"text_file: {error}") from error


def default_text() -> str:
    """Genesis from Debian's bible-kjv, verse references stripped."""
    program = shutil.which("bible")
    if program is None:
        raise ValueError(
            "text_file: no text given and Debian's bible-kjv is not installed "
            "(`make eval-deps`, or apt-get install bible-kjv-text bible-kjv); "
            "pass --text-file"
        )
    out = subprocess.run(
        [program, "-f", DEFAULT_PASSAGE], check=True, capture_output=True, text=True
    ).stdout
    return _VERSE_REF.sub("", out)


def perplexity(llm: Any, token_ids: Sequence[int], config: PplConfig) -> dict[str, Any]:
    """Perplexity of `token_ids` through `llm`'s engine and KV cache (see module doc).

    Raises:
        ValueError: the text is shorter than one window, or the pool cannot hold a batch.
    """
    num_windows = min(config.num_windows, len(token_ids) // config.window_len)
    if num_windows == 0:
        raise ValueError(
            f"text_file: {len(token_ids)} tokens, fewer than one window of "
            f"{config.window_len} (lower --window-len)"
        )
    windows = [
        list(token_ids[i * config.window_len : (i + 1) * config.window_len])
        for i in range(num_windows)
    ]
    runner = llm.engine.model_runner
    if runner.kv_caches is None:
        raise ValueError("cache_mode: perplexity through the KV cache needs a cache")
    block_size = runner.block_size
    blocks_per_window = -(-(config.window_len - 1) // block_size)  # the last token is a target
    pool = llm.engine.kv_cache_manager.pool
    batch_size = min(config.batch_size, num_windows)
    if pool.num_free_blocks < batch_size * blocks_per_window:
        raise ValueError(
            f"batch_size: {batch_size} windows of {config.window_len} tokens need "
            f"{batch_size * blocks_per_window} blocks, the pool has {pool.num_free_blocks}"
        )
    total_nll, total_count = 0.0, 0
    predictions: list[int] = []
    for start in range(0, num_windows, batch_size):
        batch = windows[start : start + batch_size]
        blocks = pool.get_new_blocks(len(batch) * blocks_per_window)
        try:
            ids = [b.block_id for b in blocks]
            tables = [
                ids[i * blocks_per_window : (i + 1) * blocks_per_window] for i in range(len(batch))
            ]
            nll, count, top1 = _score_batch(runner, batch, tables, config)
        finally:
            pool.free_blocks(blocks)
        total_nll += nll
        total_count += count
        predictions.extend(top1)
    mean_nll = total_nll / total_count
    return {
        "perplexity": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "num_scored_tokens": total_count,
        "num_windows": num_windows,
        "window_len": config.window_len,
        "prefill_len": config.prefill_len,
        "chunk_len": config.chunk_len,
        "kv_cache_dtype": llm.engine.config.kv_cache_dtype,
        "predictions": predictions,  # greedy (top-1) token after each scored position
    }


def top1_agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Share of positions where two runs over the same windows predict the same next token
    (teacher-forced: both see the true text, so one difference does not derail the rest)."""
    pairs = list(zip(a["predictions"], b["predictions"], strict=True))
    return float(sum(x == y for x, y in pairs) / len(pairs))


def _score_batch(
    runner: Any, windows: list[list[int]], tables: list[list[int]], config: PplConfig
) -> tuple[float, int, list[int]]:
    """Sum of NLL, count of scored positions and the top-1 predictions (window-major), for
    windows that run side by side."""
    import torch  # here, so that building the CLI parser stays free of torch

    nll, count = 0.0, 0
    top1 = [[] for _ in windows]  # type: list[list[int]]
    done = 0
    params = SamplingParams(temperature=0)
    while done < config.window_len - 1:  # the last token is only ever a target
        if done < config.prefill_len:
            end = min(done + config.chunk_len, config.prefill_len, config.window_len - 1)
        else:
            end = done + 1
        scheduled = [
            ScheduledRequest(
                request_id=str(i),
                token_ids=window[done:end],
                num_computed_tokens=done,
                block_ids=table[: -(-end // runner.block_size)],
                sample=False,
                sampling_params=params,
                prompt_token_ids=window,
                output_token_ids=[],
                eos_token_ids=frozenset(),
            )
            for i, (window, table) in enumerate(zip(windows, tables, strict=True))
        ]
        logits = runner.logits_for_all_tokens(scheduled)  # (num_tokens, vocab)
        targets = torch.tensor(
            [w[t + 1] for w in windows for t in range(done, end)], device=logits.device
        )
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        nll -= float(log_probs.gather(1, targets.unsqueeze(1)).sum())
        count += len(targets)
        best = log_probs.argmax(-1).view(len(windows), -1).tolist()  # (windows, end - done)
        for row, ids in zip(top1, best, strict=True):
            row.extend(ids)
        done = end
    return nll, count, [token for row in top1 for token in row]
