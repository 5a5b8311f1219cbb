"""`ModelConfig`: the shape of a model, read from an HF `config.json` dict.

Pure Python (no torch, no I/O): the caller passes the config dict and the weight files' names
and sizes, so KV sizing code can use it without importing the model layer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# HF `architectures[0]` -> family whose config keys it uses.
ARCHITECTURE_FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2",
}
# HF `model_type` -> architecture, for configs without `architectures` (some GGUF conversions).
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# RoPE variants we implement; "linear" and "llama3" rescale the inverse frequencies.
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code and KV sizing need to know about a checkpoint.

    `sliding_window` is set only when every layer slides (Mistral; Qwen2 with
    `use_sliding_window` and `max_window_layers == 0`): only then may the KV cache free
    blocks that fell out of the window. `layer_sliding_windows` holds each layer's own window
    (Qwen2 slides only in the layers >= `max_window_layers`).

    `fingerprint` is the sha256 hex of the canonical JSON of the HF config dict plus the
    sorted weight file names and byte sizes: the model's identity in prefix-cache keys.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, float], ...] = ()  # numeric RoPE parameters, sorted by name
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    sliding_window: int | None = None
    layer_sliding_windows: tuple[int | None, ...] = ()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections have a bias
    o_proj_bias: bool = False  # the output projection has a bias (Llama attention_bias)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURE_FAMILIES:
            raise ValueError(_unknown_architecture(self.architecture))
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling: rope type {self.rope_type!r} is not supported; "
                f"supported: {', '.join(ROPE_TYPES)}"
            )
        if not self.layer_sliding_windows:  # built by hand: every layer uses sliding_window
            windows = (self.sliding_window,) * self.num_hidden_layers
            object.__setattr__(self, "layer_sliding_windows", windows)
        if len(self.layer_sliding_windows) != self.num_hidden_layers:
            raise ValueError(
                f"layer_sliding_windows: needs {self.num_hidden_layers} entries, "
                f"got {len(self.layer_sliding_windows)}"
            )

    @classmethod
    def from_hf_config(
        cls, hf_config: dict[str, Any], weight_files: Sequence[tuple[str, int]] = ()
    ) -> ModelConfig:
        """Build from an HF config dict; `weight_files` are (file name, byte size) pairs.

        Raises:
            ValueError: unknown architecture, unsupported RoPE scaling or a missing key.
        """
        architecture = _architecture(hf_config)
        if ARCHITECTURE_FAMILIES[architecture] == "gpt2":
            fields = _gpt2_fields(hf_config)
        else:
            fields = _llama_fields(hf_config, architecture)
        eos = hf_config.get("eos_token_id")
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(
            architecture=architecture,
            bos_token_id=hf_config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            fingerprint=_fingerprint(hf_config, weight_files),
            **fields,
        )


def _architecture(hf_config: dict[str, Any]) -> str:
    names = hf_config.get("architectures") or []
    if names:
        name = str(names[0])
    elif hf_config.get("model_type") in _MODEL_TYPES:
        name = _MODEL_TYPES[hf_config["model_type"]]
    else:
        name = f"<none: model_type {hf_config.get('model_type')!r}>"
    if name not in ARCHITECTURE_FAMILIES:
        raise ValueError(_unknown_architecture(name))
    return name


def _unknown_architecture(name: str) -> str:
    supported = ", ".join(sorted(ARCHITECTURE_FAMILIES))
    return f"architecture {name!r} is not supported; supported: {supported}"


def _require(hf_config: dict[str, Any], key: str) -> Any:
    if hf_config.get(key) is None:
        raise ValueError(f"config.json: missing required key {key!r}")
    return hf_config[key]


def _llama_fields(hf_config: dict[str, Any], architecture: str) -> dict[str, Any]:
    hidden = _require(hf_config, "hidden_size")
    num_heads = _require(hf_config, "num_attention_heads")
    num_layers = _require(hf_config, "num_hidden_layers")
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    windows = _layer_sliding_windows(hf_config, architecture, num_layers)
    return dict(
        vocab_size=_require(hf_config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_require(hf_config, "intermediate_size"),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=hf_config.get("num_key_value_heads") or num_heads,
        head_dim=hf_config.get("head_dim") or hidden // num_heads,
        max_position_embeddings=_require(hf_config, "max_position_embeddings"),
        hidden_act=hf_config.get("hidden_act", "silu"),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        sliding_window=windows[0] if len(set(windows)) == 1 else None,
        layer_sliding_windows=windows,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention_bias=is_qwen2 or bool(hf_config.get("attention_bias", False)),
        o_proj_bias=not is_qwen2 and bool(hf_config.get("attention_bias", False)),
        mlp_bias=bool(hf_config.get("mlp_bias", False)),
        **_rope_fields(hf_config),
    )


def _layer_sliding_windows(
    hf_config: dict[str, Any], architecture: str, num_layers: int
) -> tuple[int | None, ...]:
    window = hf_config.get("sliding_window")
    if architecture == "LlamaForCausalLM" or window is None:
        return (None,) * num_layers
    if architecture == "MistralForCausalLM":
        return (window,) * num_layers
    if not hf_config.get("use_sliding_window", False):  # Qwen2
        return (None,) * num_layers
    layer_types = hf_config.get("layer_types")
    if layer_types is None:  # transformers < 5 derives them from max_window_layers
        first = hf_config.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= first else "full" for i in range(num_layers)]
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _rope_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs write a top-level
    # `rope_theta` and an optional `rope_scaling` with `rope_type` (or legacy `type`).
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    numeric = tuple(sorted((k, v) for k, v in params.items() if isinstance(v, (int, float))))
    return dict(rope_theta=float(theta), rope_type=rope_type, rope_scaling=numeric)


def _gpt2_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    if hf_config.get("scale_attn_by_inverse_layer_idx") or not hf_config.get(
        "scale_attn_weights", True
    ):
        raise ValueError(
            "config.json: GPT-2 attention scaling variants (scale_attn_by_inverse_layer_idx, "
            "scale_attn_weights=false) are not supported"
        )
    hidden = _require(hf_config, "n_embd")
    num_heads = _require(hf_config, "n_head")
    num_layers = _require(hf_config, "n_layer")
    return dict(
        vocab_size=_require(hf_config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=hf_config.get("n_inner") or 4 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden // num_heads,
        max_position_embeddings=_require(hf_config, "n_positions"),
        hidden_act=hf_config.get("activation_function", "gelu_new"),
        layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", True)),  # HF's default
        layer_sliding_windows=(None,) * num_layers,
    )


def _fingerprint(hf_config: dict[str, Any], weight_files: Sequence[tuple[str, int]]) -> str:
    canonical = {
        "config": hf_config,
        "weight_files": sorted([str(name), int(size)] for name, size in weight_files),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
