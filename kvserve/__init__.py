"""kvserve: an LLM inference engine and server built around the KV cache."""

from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.sampling_params import SamplingParams, StructuredOutputParams

__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputParams",
    "RequestOutput",
    "CompletionOutput",
    "EngineConfig",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # LLM and EngineConfig pull in torch and the model code; import them on first use so that
    # `import kvserve` (and the pure-Python KV bookkeeping) stays light.
    if name == "LLM":
        from kvserve.llm import LLM

        return LLM
    if name == "EngineConfig":
        from kvserve.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
