"""A local model's `ModelShape` for `kvserve kv-size`: its config and parameter count, no
weights read.

It reads checkpoint files with the model package's readers (`ModelConfig.from_hf_config`, the
GGUF header reader, the safetensors file list) and builds no model: besides
`kvserve.default_model`, the one import of `kvserve.model` outside the model runner
(pyproject.toml's import contract lists both).
"""

from __future__ import annotations

import json
from pathlib import Path

from kvserve.kv.planner import ModelShape
from kvserve.model.config import ModelConfig


def model_shape(path: str) -> ModelShape:
    """The shape of an HF folder (config.json + safetensors headers) or a `.gguf` file.

    Raises:
        FileNotFoundError: no such folder or file, or no config.json / weights in it.
        ValueError: an unsupported architecture or a malformed config.
    """
    folder = Path(path)
    if folder.is_file() and folder.suffix == ".gguf":
        from kvserve.model.gguf import read_gguf_config

        reader, hf_config = read_gguf_config(str(folder))
        num_params = sum(int(t.n_elements) for t in reader.tensors)
        name = folder.stem
    elif folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder}: no config.json in the model folder")
        hf_config = json.loads(config_file.read_text())
        num_params = _safetensors_params(folder)
        name = folder.name
    else:
        raise FileNotFoundError(f"{folder}: no such model folder or .gguf file")
    config = ModelConfig.from_hf_config(hf_config)
    return ModelShape(
        name=name,
        num_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        num_params=num_params,
        max_position_embeddings=config.max_position_embeddings,
        layer_windows=config.layer_sliding_windows,
    )


def _safetensors_params(folder: Path) -> int:
    from safetensors import safe_open

    from kvserve.model.loader import _safetensors_files

    total = 0
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                count = 1
                for size in st.get_slice(name).get_shape():
                    count *= size
                total += count
    return total
