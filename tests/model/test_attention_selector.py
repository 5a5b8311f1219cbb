"""Which attention backend a runner gets (attention/selector.py), from its flags, cache and
device: the C++ kernel under `auto` where it applies, else inductor's fused kernel under
`--compile` where it reads the cache, else gather + SDPA."""

from __future__ import annotations

import pytest
import torch

from kvserve.model.attention import select_attention_backend
from tests.helpers import decode_kernel_expected

CPU = torch.device("cpu")


def _select(
    requested: str,
    compiled: bool,
    cache_dtype: torch.dtype,
    device: torch.device = CPU,
    model_dtype: torch.dtype = torch.float32,
) -> str:
    backend = select_attention_backend(
        requested,
        compiled=compiled,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        cache_dtype=cache_dtype,
        model_dtype=model_dtype,
        device=device,
    )
    return backend.name


@pytest.mark.parametrize(
    "cache_dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.int8],
    ids=["float32", "float16", "bfloat16", "int8"],
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_auto_takes_the_cpp_kernel_for_the_caches_it_reads(
    cache_dtype: torch.dtype, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvserve.model import fused_attention

    monkeypatch.setattr(fused_attention, "_cpu_vectorizes_bytes", lambda: True)
    fallback = "fused" if compiled else "torch"
    expected = "cpp" if decode_kernel_expected() else fallback
    assert _select("auto", compiled, cache_dtype) == expected
    assert _select("torch", compiled, cache_dtype) == fallback


def test_caches_the_cpp_kernel_does_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvserve.model import fused_attention

    monkeypatch.setattr(fused_attention, "_cpu_vectorizes_bytes", lambda: True)
    assert _select("auto", False, torch.float8_e4m3fn) == "torch"
    assert _select("auto", True, torch.float8_e4m3fn) == "fused"
    assert _select("auto", True, torch.uint8) == "torch"  # int4: no fused reader either


def test_byte_caches_skip_the_fused_kernel_where_inductor_does_not_vectorize_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvserve.model import fused_attention

    monkeypatch.setattr(fused_attention, "_cpu_vectorizes_bytes", lambda: False)
    assert _select("torch", True, torch.int8) == "torch"
    assert _select("torch", True, torch.float8_e4m3fn) == "torch"
    assert _select("torch", True, torch.float32) == "fused"


def test_the_cpp_kernel_only_on_the_cpu_for_a_float32_model() -> None:
    assert _select("auto", False, torch.float32, device=torch.device("cuda")) == "torch"
    assert _select("auto", True, torch.float32, device=torch.device("cuda")) == "fused"
    assert _select("auto", False, torch.bfloat16, model_dtype=torch.bfloat16) == "torch"


def test_an_unknown_backend_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="attention_backend"):
        _select("flash", False, torch.float32)
