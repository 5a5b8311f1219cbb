"""`kvserve generate` and `kvserve chat`: text streamed to stdout, then one line of stats."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator
from typing import Any

from kvserve.cli.startup import log_ready
from kvserve.config import EngineConfig
from kvserve.sampling_params import SamplingParams


def add_subcommands(commands: Any) -> None:
    generate = commands.add_parser("generate", help="generate text for one or more prompts")
    generate.add_argument("--prompt", action="append", required=True, help="repeatable")
    generate.add_argument("--chat", action="store_true", help="apply the chat template")
    add_sampling_args(generate)
    EngineConfig.add_cli_args(generate)
    generate.set_defaults(func=run_generate)

    chat = commands.add_parser("chat", help="interactive chat, streamed")
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(chat, max_tokens=256)
    EngineConfig.add_cli_args(chat)
    chat.set_defaults(func=run_chat)


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")
    group.add_argument("--repetition-penalty", type=float, default=1.0)


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        repetition_penalty=args.repetition_penalty,
    )


def run_generate(args: argparse.Namespace) -> int:
    from kvserve.llm import LLM

    llm = LLM(**dataclasses.asdict(EngineConfig.from_cli_args(args)))
    log_ready("engine")
    params = sampling_params_from_args(args)
    for prompt in args.prompt:
        if args.chat:
            prompt_input: Any = llm.chat_prompt([{"role": "user", "content": prompt}])
        else:
            prompt_input = prompt
        _stream_to_stdout(llm, prompt_input, params)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from kvserve.llm import LLM

    llm = LLM(**dataclasses.asdict(EngineConfig.from_cli_args(args)))
    log_ready("engine")
    params = sampling_params_from_args(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("kvserve chat: type a message, empty line or Ctrl-D to quit.", file=sys.stderr)
    for line in _read_lines():
        history.append({"role": "user", "content": line})
        reply = _stream_to_stdout(llm, llm.chat_prompt(history), params)
        history.append({"role": "assistant", "content": reply})
    return 0


def _read_lines() -> Iterator[str]:
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if not line:
            return
        yield line


def _stream_to_stdout(llm: Any, prompt: Any, params: SamplingParams) -> str:
    """Print text as it is generated, then one line of stats; return the text."""
    start = time.perf_counter()
    printed, output, first_token = "", None, 0.0
    peak_blocks = 0
    for output in llm.generate_stream(prompt, params):
        first_token = first_token or time.perf_counter() - start
        text = output.outputs[0].text
        if text.startswith(printed):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
        peak_blocks = max(peak_blocks, llm.engine.kv_cache_manager.num_used_blocks)
    assert output is not None
    elapsed = time.perf_counter() - start
    completion = output.outputs[0]
    num_tokens = len(completion.token_ids)
    total_blocks = llm.engine.kv_cache_manager.num_blocks
    final: str = completion.text
    print(final[len(printed) :])
    print(
        f"[{num_tokens} tokens in {elapsed:.2f} s, {num_tokens / elapsed:.1f} tok/s, first after "
        f"{first_token:.2f} s; "
        f"prompt {len(output.prompt_token_ids)} tokens ({output.num_cached_tokens} cached); "
        f"KV blocks used: {peak_blocks} of {total_blocks}; finish: {completion.finish_reason}]",
        file=sys.stderr,
    )
    return final
