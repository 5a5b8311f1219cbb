"""The lean decode step (kvserve/model/lean_decode.py) computes the modules' bits.

Every run below is made twice on one engine, with `use_lean_decode` on and off, and must give
the same tokens and the same top-5 logprobs to the last bit: the lean step calls the same
kernels on the same tensors in the same order. Three prompts of different lengths, so decode
steps hold several rows with different contexts, and mixed steps (prefill + decode, which always
run the modules) alternate with all-decode steps (which take the lean path, counted).
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from kvserve.kernels.quant import quant_kernel
from kvserve.model.lean_decode import LeanDecode
from kvserve.sampling_params import SamplingParams
from tests.gguf_files import TINY_CONFIG
from tests.helpers import make_engine, random_prompts, run_engine
from tests.model.test_stored_weights import Q4_K_M, _checkpoint

pytestmark = pytest.mark.skipif(quant_kernel() is None, reason="the C++ layer ops do not build")

SAMPLING = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)


def _runs(model: str, monkeypatch: pytest.MonkeyPatch, **engine_args: object) -> tuple:
    """(lean outputs, module outputs, lean steps taken) for three prompts on one engine."""
    engine = make_engine(
        model, max_num_batched_tokens=32, enable_prefix_caching=False, **engine_args
    )  # no prefix hits: the second run schedules as the first
    vocab = engine.model_runner.model.config.vocab_size
    prompts = random_prompts(vocab, [5, 23, 40], seed=1)
    calls = []
    original = LeanDecode.__call__

    def counted(self, x, *args):
        calls.append(x.shape[0])
        return original(self, x, *args)

    monkeypatch.setattr(LeanDecode, "__call__", counted)
    lean = run_engine(engine, prompts, SAMPLING)
    engine.model_runner.model.use_lean_decode = False
    lean_calls = list(calls)
    modules = run_engine(engine, prompts, SAMPLING)
    assert len(calls) == len(lean_calls), "use_lean_decode=False still took the lean path"
    return lean, modules, lean_calls


def _assert_same(lean, modules) -> None:
    for a, b in zip(lean, modules, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs  # exact floats


@pytest.mark.parametrize(
    "name",
    ["llama", "llama_tied", "llama_mqa", "llama_head_dim", "mistral", "qwen2", "qwen2_swa"],
)
def test_hf_checkpoints(tiny_checkpoints, monkeypatch, name: str) -> None:
    """Float32 weights (F.linear): GQA, MQA, tied heads, biases, head_dim != hidden / heads,
    sliding windows on all or some layers."""
    lean, modules, calls = _runs(str(tiny_checkpoints[name]), monkeypatch)
    _assert_same(lean, modules)
    assert calls and max(calls) == 3 and min(calls) >= 1  # steps of 1 to 3 decode rows


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "float16", "int8", "int4"])
def test_kv_cache_dtypes(tiny_checkpoints, monkeypatch, kv_cache_dtype: str) -> None:
    """Float caches write through the C++ op, the others through `write_layer`; int4 has no
    C++ attention and decodes through torch's backend."""
    lean, modules, calls = _runs(
        str(tiny_checkpoints["llama"]), monkeypatch, kv_cache_dtype=kv_cache_dtype
    )
    _assert_same(lean, modules)
    assert calls


@pytest.mark.parametrize("formats", [T.Q4_1, T.Q8_0, "q4_k_m"], ids=str)
def test_gguf_weights_as_stored(tmp_path, monkeypatch, formats) -> None:
    """One-piece quantized layers call the kernel directly; the Q4_K_M mix stacks q+k (Q4_K)
    and v (Q6_K) in one layer, which runs its own forward."""
    path, _ = _checkpoint(tmp_path, "llama", Q4_K_M if formats == "q4_k_m" else formats)
    lean, modules, calls = _runs(path, monkeypatch)
    _assert_same(lean, modules)
    assert calls and TINY_CONFIG["num_hidden_layers"] == 2


def test_torch_attention_backend(tiny_checkpoints, monkeypatch) -> None:
    lean, modules, calls = _runs(
        str(tiny_checkpoints["mistral"]), monkeypatch, attention_backend="torch"
    )
    _assert_same(lean, modules)
    assert calls


def test_not_built_where_the_modules_take_torch_ops(tiny_checkpoints) -> None:
    engine = make_engine(str(tiny_checkpoints["llama"]), dtype="bfloat16")
    assert LeanDecode.build(engine.model_runner.model.model) is None
    engine = make_engine(str(tiny_checkpoints["llama"]))
    assert LeanDecode.build(engine.model_runner.model.model) is not None
    assert torch.get_default_dtype() == torch.float32
