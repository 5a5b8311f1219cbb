"""`kvserve` command line: generate | chat | bench (more subcommands arrive with their issues).

Engine flags are generated from the fields of `EngineConfig` (vLLM spelling), so every engine
argument is a flag everywhere an engine is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, Union, get_args, get_origin, get_type_hints

from kvserve.config import EngineConfig
from kvserve.sampling_params import SamplingParams
from kvserve.server.limits import add_limit_args


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineConfig` field: `max_num_seqs` -> `--max-num-seqs`."""
    group = parser.add_argument_group("engine")
    hints = get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, type=kind, help=f"{help_text} (default: {field.default})")
    parser.set_defaults(_engine_flags=True)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Only flags the user gave override the dataclass defaults."""
    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(EngineConfig)
        if getattr(args, field.name, None) is not None
    }
    return EngineConfig(**given)


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


def _base_type(annotation: Any) -> Callable[[str], Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is tuple:
        return _int_tuple
    return annotation  # type: ignore[no-any-return]


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from error


# ---- subcommands -------------------------------------------------------------------------


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvserve.llm import LLM

    llm = LLM(**dataclasses.asdict(engine_config_from_args(args)))
    params = sampling_params_from_args(args)
    for prompt in args.prompt:
        if args.chat:
            prompt_input: Any = llm.chat_prompt([{"role": "user", "content": prompt}])
        else:
            prompt_input = prompt
        _stream_to_stdout(llm, prompt_input, params)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from kvserve.llm import LLM

    llm = LLM(**dataclasses.asdict(engine_config_from_args(args)))
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
    printed, output = "", None
    peak_blocks = 0
    for output in llm.generate_stream(prompt, params):
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
        f"[{num_tokens} tokens in {elapsed:.2f} s, {num_tokens / elapsed:.1f} tok/s; "
        f"prompt {len(output.prompt_token_ids)} tokens ({output.num_cached_tokens} cached); "
        f"KV blocks used: {peak_blocks} of {total_blocks}; finish: {completion.finish_reason}]",
        file=sys.stderr,
    )
    return final


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvserve.engine.engine import Engine
    from kvserve.server.async_engine import AsyncEngine
    from kvserve.server.launch import serve
    from kvserve.server.limits import limits_from_args

    limits = limits_from_args(args)  # before loading the model: a bad flag fails fast
    engine = Engine(engine_config_from_args(args))
    name = args.served_model_name or _model_name(engine.model_path)
    async_engine = AsyncEngine(engine)
    serve(async_engine, name, args.host, args.port, args.api_key, limits, args.public_metrics)
    return 0


def _model_name(model_path: str) -> str:
    """A folder's or file's name, without `.gguf` (the default model: SmolLM2-135M-Instruct)."""
    base = os.path.basename(os.path.normpath(model_path))
    name = base.removesuffix(".gguf")
    return name.rsplit("-Q", 1)[0] if "SmolLM2" in name else name


def _cmd_kv_size(args: argparse.Namespace) -> int:
    import json

    from kvserve.kv.planner import PRESETS, plan_kv

    if (args.model is None) == (args.preset is None):
        raise ValueError("model / preset: give exactly one (--model PATH or --preset NAME)")
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise ValueError(f"preset: must be one of {', '.join(PRESETS)}; got {args.preset!r}")
        shape = PRESETS[args.preset]
    else:
        from kvserve.model.shape import model_shape

        shape = model_shape(args.model)
    plan = plan_kv(shape, args.batch_size, args.seq_len, args.kv_cache_dtype, args.dtype,
                   args.memory_gb, args.block_size)  # fmt: skip
    if args.json:
        print(json.dumps({"shape": shape.__dict__, "plan": plan.as_dict()}, indent=2))
        return 0
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
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:>{width}}  {value}")
    return 0


def _bytes(count: int) -> str:
    return f"{count:,} bytes ({count / (1 << 30):.3f} GiB)"


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvserve.bench import offline

    return offline.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text for one or more prompts")
    generate.add_argument("--prompt", action="append", required=True, help="repeatable")
    generate.add_argument("--chat", action="store_true", help="apply the chat template")
    add_sampling_args(generate)
    add_engine_args(generate)
    generate.set_defaults(func=_cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat, streamed")
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(chat, max_tokens=256)
    add_engine_args(chat)
    chat.set_defaults(func=_cmd_chat)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="default: the model's name")
    serve.add_argument(
        "--api-key", default=None, help="every path but /health needs 'Authorization: Bearer KEY'"
    )
    serve.add_argument(
        "--public-metrics", action="store_true", help="/metrics without the API key (scrapers)"
    )
    add_limit_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=_cmd_serve)

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
    kv_size.set_defaults(func=_cmd_kv_size)

    from kvserve.bench import perplexity

    perplexity.add_subcommand(commands, add_engine_args)

    from kvserve.trace import cli as trace_cli

    trace_cli.add_subcommands(commands)

    bench = commands.add_parser(
        "bench", help="benchmarks (latency, throughput, prefix, memory, serve, kv-dtype)"
    )
    from kvserve.bench import offline

    offline.add_subcommands(bench, add_engine_args)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
