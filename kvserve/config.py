"""Engine arguments: one frozen dataclass, validated on construction, no I/O.

CLI flags are generated from these fields (`EngineConfig.add_cli_args`), vLLM spelling: the
field `max_num_seqs` is the flag `--max-num-seqs`; `EngineConfig.from_cli_args` reads them
back. Every command that builds an engine uses the pair, so every engine argument is a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

CacheMode = Literal["paged", "contiguous", "none"]
CACHE_MODES: tuple[str, ...] = ("paged", "contiguous", "none")
KV_CACHE_DTYPES: tuple[str, ...] = (
    "auto",
    "float32",
    "float16",
    "bfloat16",
    "fp8_e4m3",
    "int8",
    "int4",
)
PREEMPTION_MODES: tuple[str, ...] = ("recompute", "swap")
KV_RESTORE_MODES: tuple[str, ...] = ("auto", "always", "never")
KV_REMOTE_SECRET_ENV = "KVSERVE_KV_REMOTE_SECRET"
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "torch")
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
WEIGHT_FORMATS: tuple[str, ...] = ("auto", "float32")
DEFAULT_KV_CACHE_MEMORY_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine. `None` means "derive it from the model"."""

    model: str | None = field(
        default=None, metadata={"help": "HF folder or .gguf file; default: SmolLM2-135M-Instruct"}
    )
    block_size: int = field(default=16, metadata={"help": "tokens per KV block (power of two)"})
    kv_cache_memory_bytes: int | None = field(
        default=None, metadata={"help": "bytes for the KV pool (default 1 GiB)"}
    )
    num_kv_blocks: int | None = field(
        default=None, metadata={"help": "exact number of KV blocks (overrides the byte budget)"}
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "longest prompt + output (default: the model's, max 4096)"}
    )
    max_num_seqs: int = field(default=64, metadata={"help": "most requests running at once"})
    max_num_batched_tokens: int = field(
        default=512, metadata={"help": "token budget of one step (decode tokens + prefill chunks)"}
    )
    enable_chunked_prefill: bool = field(
        default=True, metadata={"help": "split long prompts into chunks that fit the budget"}
    )
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse cached KV blocks"})
    cache_mode: str = field(
        default="paged", metadata={"help": "paged | contiguous (reserve max_model_len) | none"}
    )
    kv_cache_dtype: str = field(default="auto", metadata={"help": "dtype of stored K/V"})
    attention_backend: str = field(
        default="auto",
        metadata={
            "help": "auto: decode attention in kvserve's C++ kernel where it applies (CPU, "
            "float32 model, float32/float16/bfloat16/int8 cache; built once per cache dtype "
            "on first use); torch: SDPA, or inductor's kernel with --compile"
        },
    )
    preemption_mode: str = field(
        default="recompute",
        metadata={
            "help": "recompute: drop a preempted request's KV and prefill it again on resume; "
            "swap: move its blocks to a KV tier and load them back (needs a tier)"
        },
    )
    kv_cpu_bytes: int = field(
        default=0, metadata={"help": "host-RAM KV tier below the pool, LRU by bytes (0: off)"}
    )
    kv_disk_dir: str | None = field(
        default=None, metadata={"help": "directory of the disk KV tier: survives restarts"}
    )
    kv_disk_bytes: int = field(
        default=10 * 2**30, metadata={"help": "bytes the disk KV tier may hold, LRU"}
    )
    kv_remote_url: str | None = field(
        default=None,
        metadata={
            "help": "Redis URL of the shared KV tier, e.g. redis://127.0.0.1:6379/0 "
            "(password in the URL as redis-py reads it)"
        },
    )
    kv_remote_secret: str | None = field(
        default=None,
        repr=False,
        metadata={
            "env": KV_REMOTE_SECRET_ENV,
            "help": "signs every KV tier entry (HMAC); read from the environment, never a flag",
        },
    )
    kv_restore: str = field(
        default="auto",
        metadata={
            "help": "auto: load a prefix found in a KV tier when that is predicted faster than "
            "recomputing it; always; never"
        },
    )
    dtype: str = field(default="float32", metadata={"help": "compute dtype of the model"})
    weight_format: str = field(
        default="auto",
        metadata={
            "help": "auto: GGUF weights stay as stored (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16, "
            "BF16) and run through kvserve's C++ kernels, on a float32 model on the CPU; "
            "float32: dequantize every weight at load"
        },
    )
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    seed: int = field(default=0, metadata={"help": "seed of unseeded sampling"})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads (default: torch's choice)"}
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile decode steps per batch-size bucket (slow start-up)"},
    )
    compile_sizes: tuple[int, ...] = field(
        default=(1, 2, 4, 8, 16, 32, 64),
        metadata={"help": "decode batch-size buckets to compile, comma-separated"},
    )

    def __post_init__(self) -> None:
        _require_power_of_two("block_size", self.block_size)
        _require_positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        _require_positive("num_kv_blocks", self.num_kv_blocks)
        _require_positive("max_model_len", self.max_model_len)
        _require_positive("max_num_seqs", self.max_num_seqs)
        _require_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _require_positive("num_threads", self.num_threads)
        _require_positive("kv_disk_bytes", self.kv_disk_bytes)
        if not isinstance(self.kv_cpu_bytes, int) or self.kv_cpu_bytes < 0:
            raise ValueError(f"kv_cpu_bytes: must be an integer >= 0, got {self.kv_cpu_bytes!r}")
        _require_choice("cache_mode", self.cache_mode, CACHE_MODES)
        _require_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _require_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _require_choice("preemption_mode", self.preemption_mode, PREEMPTION_MODES)
        _require_choice("kv_restore", self.kv_restore, KV_RESTORE_MODES)
        if self.preemption_mode == "swap" and not self.has_kv_tiers:
            raise ValueError(
                "preemption_mode: 'swap' needs a KV tier (kv_cpu_bytes, kv_disk_dir or "
                "kv_remote_url) to swap blocks to"
            )
        if self.kv_remote_url is not None and not self.kv_remote_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"kv_remote_url: must be a redis://, rediss:// or unix:// URL, got "
                f"{self.kv_remote_url!r}"
            )
        _require_choice("dtype", self.dtype, DTYPES)
        _require_choice("weight_format", self.weight_format, WEIGHT_FORMATS)
        object.__setattr__(self, "compile_sizes", tuple(sorted(set(self.compile_sizes))))
        if not self.compile_sizes or any(
            not isinstance(size, int) or size <= 0 for size in self.compile_sizes
        ):
            raise ValueError(
                f"compile_sizes: must be positive integers, got {self.compile_sizes!r}"
            )
        if not isinstance(self.seed, int):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device: must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @property
    def has_kv_tiers(self) -> bool:
        """True when some KV tier below the pool is configured."""
        return self.kv_cpu_bytes > 0 or self.kv_disk_dir is not None or bool(self.kv_remote_url)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field, in an "engine" group: `max_num_seqs` -> `--max-num-seqs`.

        Every flag defaults to None, so `from_cli_args` can tell a given flag from an absent
        one; booleans get `--flag` / `--no-flag`, tuples comma-separated integers.
        """
        group = parser.add_argument_group("engine")
        hints = get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if "env" in item.metadata:  # secrets: from the environment, never a command line
                continue
            flag = "--" + item.name.replace("_", "-")
            kind = _flag_type(hints[item.name])
            help_text = item.metadata.get("help", "")
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(flag, type=kind, help=f"{help_text} (default: {item.default})")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        """The config of the flags `add_cli_args` made; only flags given override defaults.

        Fields with an "env" name in their metadata (secrets) are read from that environment
        variable instead.

        Raises:
            ValueError: a flag's value is invalid (names the field).
        """
        given = {
            item.name: getattr(args, item.name)
            for item in dataclasses.fields(cls)
            if getattr(args, item.name, None) is not None
        }
        for item in dataclasses.fields(cls):
            if "env" in item.metadata and os.environ.get(item.metadata["env"]):
                given[item.name] = os.environ[item.metadata["env"]]
        return cls(**given)


def _flag_type(annotation: Any) -> Callable[[str], Any]:
    """The argparse `type` of a field: `int | None` -> int, `tuple[int, ...]` -> int list."""
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


def _require_positive(name: str, value: int | None) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def _require_power_of_two(name: str, value: int) -> None:
    _require_positive(name, value)
    if value & (value - 1):
        raise ValueError(f"{name}: must be a power of two, got {value}")


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}; got {value!r}")
