"""Weights as stored: safetensors files of ggml blocks, and layers swapped to stored formats.

kvserve writes a GGUF's tensors into safetensors as they are stored (`save_stored`): float32
tensors as float32, every other tensor as its (rows, row_bytes) uint8 blocks, with the ggml type
and row length of each in the file's metadata under `kvserve.ggml`. Reading such a file
(`read_safetensors`) gives back the same `QuantTensor`s, mapped from the page cache, so a
converted model starts without parsing the GGUF again. Files without that metadata read as
plain tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from kvserve.model.layers import MergedLinear
from kvserve.model.quant_linear import QuantEmbedding, QuantLinear, QuantTensor

GGML_METADATA_KEY = "kvserve.ggml"
# Modules whose weight may stay as stored.
STORABLE_MODULES = (nn.Linear, nn.Embedding)


def save_stored(state_dict: dict[str, Tensor | QuantTensor], path: str | Path) -> None:
    """Write tensors and stored-format matrices to one safetensors file."""
    tensors: dict[str, Tensor] = {}
    ggml: dict[str, list[int]] = {}
    for name, value in state_dict.items():
        if isinstance(value, QuantTensor):
            tensors[name] = value.data.contiguous()  # (rows, row_bytes) uint8
            ggml[name] = [value.qtype, value.in_features]
        else:
            tensors[name] = value.contiguous()
    metadata = {"format": "pt", GGML_METADATA_KEY: json.dumps(ggml, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)


def read_safetensors(files: list[Path]) -> Iterator[tuple[str, Tensor | QuantTensor]]:
    """(name, tensor) of every tensor in `files`; stored-format ones as `QuantTensor`."""
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            metadata = st.metadata() or {}
            ggml = json.loads(metadata.get(GGML_METADATA_KEY, "{}"))
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = st.get_tensor(name)
                if name in ggml:
                    qtype, in_features = ggml[name]
                    yield name, QuantTensor(tensor, int(qtype), int(in_features))
                else:
                    yield name, tensor


def swap_in_stored(model: nn.Module, module_name: str, pieces: dict[int, QuantTensor]) -> None:
    """Replace the linear or embedding `module_name` by its stored-format twin.

    `pieces` maps row offsets to stored matrices. A fused linear whose other pieces were
    loaded as float32 keeps those rows as ggml F32 pieces, so one layer may mix formats;
    adjacent pieces of one format are stacked into one matrix.
    """
    module = model.get_submodule(module_name)
    if isinstance(module, nn.Embedding):
        replacement: nn.Module = QuantEmbedding(pieces[0])
    else:
        assert isinstance(module, nn.Linear)
        sizes = module.output_sizes if isinstance(module, MergedLinear) else [module.out_features]
        ordered, offset = [], 0
        for size in sizes:
            rows = module.weight.narrow(0, offset, size)  # (size, in), float rows
            ordered.append(pieces.get(offset) or QuantTensor.from_float(rows))
            offset += size
        bias = None if module.bias is None else module.bias.detach()
        replacement = QuantLinear(_merge_runs(ordered), bias)
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)


def _merge_runs(pieces: list[QuantTensor]) -> list[QuantTensor]:
    """Adjacent pieces of one format as one matrix (their rows stacked): one kernel call."""
    merged = [pieces[0]]
    for piece in pieces[1:]:
        last = merged[-1]
        if piece.qtype == last.qtype:
            data = torch.cat([last.data, piece.data])  # (rows + rows', row_bytes)
            merged[-1] = QuantTensor(data, last.qtype, last.in_features)
        else:
            merged.append(piece)
    return merged


def stored_summary(model: nn.Module) -> str:
    """One line on what is stored how: e.g. "210 Q4_1 + 1 Q8_0 matrices (100.2 MB as stored)"."""
    from kvserve.kernels.quant import QUANT_TYPES

    counts: dict[str, int] = {}
    stored_bytes = 0
    for module in model.modules():
        if isinstance(module, QuantLinear | QuantEmbedding):
            qtypes = module.qtypes if isinstance(module, QuantLinear) else [module.qtype]
            for qtype in qtypes:
                counts[QUANT_TYPES[qtype]] = counts.get(QUANT_TYPES[qtype], 0) + 1
            stored_bytes += sum(b.numel() for b in module.buffers())
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kinds = " + ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "no"
    return (
        f"{kinds} matrices as stored ({stored_bytes / 1e6:.1f} MB), "
        f"{float_bytes / 1e6:.1f} MB of float parameters"
    )


def uses_stored_weights(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear | QuantEmbedding) for m in model.modules())
