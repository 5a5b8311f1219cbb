"""HF `architectures[0]` -> model class."""

from __future__ import annotations

from kvserve.model.gpt2 import GPT2LMHeadModel
from kvserve.model.layers import CausalLM
from kvserve.model.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


def get_model_class(architecture: str) -> type[CausalLM]:
    """Raises ValueError naming the architecture and the supported ones."""
    if architecture not in MODEL_CLASSES:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {supported}")
    return MODEL_CLASSES[architecture]
