"""Load an HF folder (config.json + safetensors) or a .gguf file into a kvserve model.

Loading is a strict name check: every checkpoint tensor lands in exactly one parameter (or
one row block of a fused parameter) of the same shape, and every parameter gets filled.
Missing, unexpected or misshapen tensors are a ValueError naming the tensor. The only
exceptions to "same name, same shape" are this table:

    checkpoint tensor                           what the loader does           why
    ------------------------------------------  -----------------------------  -------------------
    *.q_proj / k_proj / v_proj (.weight, .bias) rows 0 / 1 / 2 of *.qkv_proj   one matmul (Llama,
    *.gate_proj / up_proj (.weight, .bias)      rows 0 / 1 of *.gate_up_proj   Mistral, Qwen2)
    Qwen2 q/k/v .bias                           stacked as above; o_proj has   Qwen2 attention:
                                                no bias                        attention_bias set
    GPT-2 attn.c_attn, attn.c_proj, mlp.c_fc,   transposed                     HF Conv1D stores
    mlp.c_proj .weight                                                         (in, out)
    lm_head.weight when tie_word_embeddings     skipped                        logits use the input
                                                                               embedding
    GPT-2 names without "transformer."          prefixed with it               saved from GPT2Model
    *.rotary_emb.inv_freq, GPT-2 .attn.bias     skipped                        buffers that old
    and .attn.masked_bias                                                      checkpoints store

GGUF files are read by `kvserve.model.gguf.load_gguf`, which returns HF names and HF shapes
(Q/K already un-permuted), so they go through the same table.

Weights as stored (`weight_format="auto"`): a checkpoint matrix in a ggml block format (a
`QuantTensor`, from a .gguf file or from a safetensors file that kvserve wrote with
`save_stored`) that lands in a linear layer or the input embedding stays in its format, and the
layer becomes a `QuantLinear` / `QuantEmbedding` (quant_linear.py). That needs a float32 model
on the CPU and a format kvserve's C++ kernel reads; anything else is dequantized to float32 on
load, which `weight_format="float32"` does for every tensor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kvserve.model.config import ModelConfig
from kvserve.model.layers import CausalLM, MergedLinear
from kvserve.model.quant_linear import QuantTensor
from kvserve.model.registry import get_model_class
from kvserve.model.stored_weights import (
    STORABLE_MODULES,
    read_safetensors,
    stored_summary,
    swap_in_stored,
    uses_stored_weights,
)

# HF projection -> (fused kvserve parameter, shard index): the stacked rows of the table above.
STACKED_PARAMS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
GPT2_CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")

logger = logging.getLogger("kvserve")

__all__ = ["CausalLM", "build_model", "load_model", "load_weights"]


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    weight_format: str = "auto",
) -> CausalLM:
    """Load the model at `path` (an HF folder or a .gguf file) in eval mode.

    `weight_format`: "auto" keeps stored-format matrices as stored where the kernel applies
    (see the module docstring); "float32" dequantizes every tensor.

    Raises:
        FileNotFoundError: no such path, no config.json, no safetensors, a missing shard.
        ValueError: unknown architecture, unsupported config, missing / unexpected /
            misshapen tensors.
    """
    hf_config, weight_files, tensors = _open_checkpoint(Path(path))
    config = ModelConfig.from_hf_config(hf_config, weight_files)
    model = build_model(config, dtype, device)
    keep = weight_format == "auto" and dtype == torch.float32 and torch.device(device).type == "cpu"
    load_weights(model, tensors, keep_stored=keep)
    if uses_stored_weights(model):
        logger.info("weights: %s", stored_summary(model))
    return model


def build_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    """The model with uninitialized parameters on `device` (no time spent on random init)."""
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            empty = torch.empty(param.shape, dtype=dtype, device=device)  # (param shape)
            setattr(module, name, nn.Parameter(empty, requires_grad=False))
    return model.to(device=device, dtype=dtype).eval()  # moves the RoPE tables


class _Target(NamedTuple):
    dest: Tensor  # the parameter, or its rows for one stacked HF tensor
    transpose: bool
    module: str | None  # the linear / embedding whose weight this is (may stay as stored)
    row_offset: int  # where its rows start in that weight


def load_weights(
    model: CausalLM,
    tensors: Iterable[tuple[str, Tensor | QuantTensor]],
    keep_stored: bool = False,
) -> None:
    """Load (HF name, tensor) pairs into `model`, strictly, by the table in this module.

    `keep_stored`: stored-format matrices of linear layers and the embedding stay as stored
    where the kernel reads their format; otherwise every `QuantTensor` is dequantized.
    """
    targets = _targets(model)
    kept: dict[str, dict[int, QuantTensor]] = {}  # module -> row offset -> stored piece
    with torch.no_grad():
        for raw_name, tensor in tensors:
            name = _checkpoint_name(raw_name, model.config)
            if name is None:
                continue
            target = targets.pop(name, None)
            if target is None:
                raise ValueError(
                    f"unexpected tensor {raw_name!r} in the checkpoint "
                    "(no parameter takes it, or it appears twice)"
                )
            _check_shape(raw_name, tuple(tensor.shape), target)
            if isinstance(tensor, QuantTensor):
                if keep_stored and target.module is not None and tensor.kernel_reads:
                    kept.setdefault(target.module, {})[target.row_offset] = tensor
                    continue
                tensor = tensor.dequantize().reshape(tensor.shape)  # (rows, in) float32
            target.dest.copy_(tensor.t() if target.transpose else tensor)
    if targets:
        missing = sorted(targets)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"tensors missing from the checkpoint: {', '.join(missing[:5])}{more}")
    for module_name, pieces in kept.items():
        swap_in_stored(model, module_name, pieces)


def _check_shape(raw_name: str, shape: tuple[int, ...], target: _Target) -> None:
    expected = target.dest.shape[::-1] if target.transpose else target.dest.shape
    if shape != tuple(expected):
        raise ValueError(
            f"tensor {raw_name!r}: shape {shape} in the checkpoint, "
            f"the model expects {tuple(expected)}"
        )


def _targets(model: CausalLM) -> dict[str, _Target]:
    """HF tensor name -> where it goes in `model`."""
    is_gpt2 = model.config.architecture == "GPT2LMHeadModel"
    targets = {}
    for param_name, param in model.named_parameters():
        module_name, _, leaf = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        transpose = is_gpt2 and param_name.endswith(GPT2_CONV1D_WEIGHTS)
        storable = leaf == "weight" and not transpose and isinstance(module, STORABLE_MODULES)
        owner = module_name if storable else None
        if not isinstance(module, MergedLinear):
            targets[param_name] = _Target(param, transpose, owner, 0)
            continue
        parent, _, fused = module_name.rpartition(".")
        pieces = sorted((i, hf) for hf, (f, i) in STACKED_PARAMS.items() if f == fused)
        offset = 0
        for (_, hf_name), size in zip(pieces, module.output_sizes, strict=True):
            rows = param.narrow(0, offset, size)  # (size, *param.shape[1:])
            targets[f"{parent}.{hf_name}.{leaf}"] = _Target(rows, False, owner, offset)
            offset += size
    return targets


def _checkpoint_name(name: str, config: ModelConfig) -> str | None:
    """The HF name a model parameter would have, or None for tensors the table skips."""
    if name.endswith(SKIPPED_SUFFIXES):
        return None
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    if config.architecture == "GPT2LMHeadModel" and not name.startswith(
        ("transformer.", "lm_head.")
    ):
        return f"transformer.{name}"
    return name


def _open_checkpoint(
    path: Path,
) -> tuple[dict[str, Any], list[tuple[str, int]], Iterator[tuple[str, Tensor | QuantTensor]]]:
    """(HF config dict, weight files as (name, bytes), iterator of (HF name, tensor))."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder or .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        from kvserve.model.gguf import load_gguf

        hf_config, state_dict = load_gguf(str(path))
        return hf_config, [(path.name, path.stat().st_size)], iter(state_dict.items())
    if not path.is_dir():
        raise ValueError(f"{path}: expected an HF model folder or a .gguf file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder")
    hf_config = json.loads(config_file.read_text())
    files = _safetensors_files(path)
    weight_files = [(f.name, f.stat().st_size) for f in files]
    return hf_config, weight_files, read_safetensors(files)


def _safetensors_files(folder: Path) -> list[Path]:
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {index_file.name} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder}: no *.safetensors weights (pytorch_model.bin is not loaded: "
            "convert it to safetensors)"
        )
    return files
