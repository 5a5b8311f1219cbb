"""Paged attention against a naive reference: exact masks, GQA, windows, cache writes."""

from __future__ import annotations

import pytest
import torch

from kvserve.kv import quant
from kvserve.model.attention import (
    AttentionBackend,
    AttentionMetadata,
    causal_mask,
    paged_attention,
    plan_attention,
    select_attention_backend,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 8, 4, 16


def _torch_backend(fused: bool, kv_dtype: torch.dtype) -> AttentionBackend:
    """What a runner with `--attention-backend torch` gets, with `--compile` if `fused`: the
    fused kernel where it reads this cache, else gather + SDPA."""
    return select_attention_backend(
        "torch",
        compiled=fused,
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        cache_dtype=kv_dtype,
        model_dtype=torch.float32,
        device=torch.device("cpu"),
    )


def test_causal_mask_is_bottom_right_aligned() -> None:
    # 2 queries at positions 3 and 4 of a 5-token context, window 3
    expected = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5, 3, torch.device("cpu")), expected)
    full = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5, None, torch.device("cpu")), full)


def _reference(q, keys, values, window):  # one seq: (q_len, h, d), (k_len, kv, d) x2
    q_len, k_len = q.shape[0], keys.shape[0]
    groups = NUM_HEADS // NUM_KV_HEADS
    k = keys.repeat_interleave(groups, dim=1)  # (k_len, h, d)
    v = values.repeat_interleave(groups, dim=1)  # (k_len, h, d)
    scores = torch.einsum("qhd,khd->hqk", q, k) * HEAD_DIM**-0.5  # (h, q_len, k_len)
    mask = causal_mask(q_len, k_len, window, q.device)  # (q_len, k_len)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # (h, q_len, k_len)
    return torch.einsum("hqk,khd->qhd", weights, v)  # (q_len, h, d)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(
    "kv_dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.uint8],
    ids=["float32", "float16", "bfloat16", "fp8_e4m3", "int8", "int4"],
)
@pytest.mark.parametrize("fused", [False, True], ids=["sdpa", "fused"])
def test_paged_attention_matches_reference(
    window: int | None, kv_dtype: torch.dtype, fused: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    # two decodes (contexts 7 and 13), a chunk of 4 after 6 cached tokens, a whole prompt of 5
    num_cached, q_lens = [6, 12, 6, 0], [1, 1, 4, 5]
    seq_lens = [c + n for c, n in zip(num_cached, q_lens, strict=True)]
    blocks = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    tables = [blocks[0:2], blocks[2:6], blocks[6:9], blocks[9:11]]
    context = [torch.randn(n, 2, NUM_KV_HEADS, HEAD_DIM, generator=generator) for n in seq_lens]
    kv_cache = quant.allocate_layer(
        NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, kv_dtype, torch.device("cpu")
    )
    for table, kv, cached in zip(
        tables, context, num_cached, strict=True
    ):  # tokens computed before, written (and quantized) as an earlier step would have
        slots_before = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(cached)]
        quant.write_layer(
            kv_cache, kv[:cached, 0], kv[:cached, 1], torch.tensor(slots_before, dtype=torch.long)
        )
    slots = [
        table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
        for table, c, n in zip(tables, num_cached, q_lens, strict=True)
        for p in range(c, c + n)
    ]
    md = AttentionMetadata(
        query_start_loc=[0, 1, 2, 6, 11],
        seq_lens=seq_lens,
        num_decodes=2,
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (4 - len(t)) for t in tables]),
        block_size=BLOCK_SIZE,
        backend=_torch_backend(fused, kv_dtype),
    )
    new_kv = torch.cat(
        [kv[c:] for kv, c in zip(context, num_cached, strict=True)]
    )  # (11, 2, kv, d)
    q = torch.randn(11, NUM_HEADS, HEAD_DIM, generator=generator)
    plan = plan_attention(md, window, cached=True, device=torch.device("cpu"))
    out = paged_attention(q, new_kv[:, 0], new_kv[:, 1], kv_cache, plan, HEAD_DIM**-0.5)

    assert kv_cache.k.dtype == kv_dtype
    if kv_dtype == torch.uint8:  # int4 keys are grouped per block: read the cache back
        rounded = [
            _read_back(kv_cache, table, len(kv)) for table, kv in zip(tables, context, strict=True)
        ]
    else:
        rounded = [_stored(kv, kv_dtype) for kv in context]  # what the cache holds
    starts = md.query_start_loc
    expected = torch.cat(
        [
            _reference(q[starts[i] : starts[i + 1]], kv[:, 0], kv[:, 1], window)
            for i, kv in enumerate(rounded)
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def _stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a cache of `dtype` gives back for x: the quantization round trip."""
    if dtype == torch.int8:
        return quant.dequantize(*quant.quantize_int8(x), torch.float32)
    if dtype == torch.float8_e4m3fn:
        return quant.quantize_fp8(x).float()
    return x.to(dtype).float()


def _read_back(layer: quant.LayerKV, table: list[int], length: int) -> torch.Tensor:
    """(length, 2, kv_heads, head_dim): a seq's K and V as the cache gives them back."""
    ids = torch.tensor(table)
    k = quant.read_blocks(layer.k, layer.k_scale, ids, torch.float32).flatten(0, 1)[:length]
    v = quant.read_blocks(layer.v, layer.v_scale, ids, torch.float32).flatten(0, 1)[:length]
    return torch.stack([k, v], dim=1)


def test_without_cache_each_seq_attends_to_itself_only() -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(7, NUM_HEADS, HEAD_DIM, generator=generator)
    k, v = torch.randn(2, 7, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    md = AttentionMetadata([0, 3, 7], [3, 4], 0, None, None, BLOCK_SIZE)
    plan = plan_attention(md, 2, cached=False, device=torch.device("cpu"))
    out = paged_attention(q, k, v, None, plan, HEAD_DIM**-0.5)
    expected = torch.cat([_reference(q[a:b], k[a:b], v[a:b], 2) for a, b in [(0, 3), (3, 7)]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("fused", [False, True], ids=["sdpa", "fused"])
def test_decodes_grouped_by_length_match_the_reference(window: int | None, fused: bool) -> None:
    """Contexts 3..60 tokens (1..15 blocks): several groups, rows come back in order.

    Fused, the groups have 1 or more rows and 1 or more blocks: every shape class the
    dynamically compiled kernel specializes on.
    """
    generator = torch.Generator().manual_seed(1)
    seq_lens = [60, 3, 33, 58, 17, 9, 41, 26]
    num_blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    ids = (torch.randperm(127, generator=generator) + 1).tolist()
    tables, start = [], 0
    for count in num_blocks:
        tables.append(ids[start : start + count])
        start += count
    shape = (128, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kv_cache = quant.LayerKV(torch.zeros(shape), torch.zeros(shape))
    context = [torch.randn(n, 2, NUM_KV_HEADS, HEAD_DIM, generator=generator) for n in seq_lens]
    for table, kv, n in zip(tables, context, seq_lens, strict=True):  # all but the new token
        for p in range(n - 1):
            slot = divmod(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE, BLOCK_SIZE)
            kv_cache.k[slot], kv_cache.v[slot] = kv[p, 0], kv[p, 1]
    width = max(num_blocks)
    md = AttentionMetadata(
        query_start_loc=list(range(len(seq_lens) + 1)),
        seq_lens=seq_lens,
        num_decodes=len(seq_lens),
        slot_mapping=torch.tensor(
            [
                t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
                for t, n in zip(tables, seq_lens, strict=True)
            ]
        ),  # fmt: skip
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        block_size=BLOCK_SIZE,
        backend=_torch_backend(fused, torch.float32),
    )
    plan = plan_attention(md, window, cached=True, device=torch.device("cpu"))
    assert plan.backend.name == ("fused" if fused else "torch")
    assert plan.num_decodes == len(seq_lens) and len(plan.decode) > 2
    q = torch.randn(len(seq_lens), NUM_HEADS, HEAD_DIM, generator=generator)
    new_kv = torch.stack([kv[-1] for kv in context])  # (num_decodes, 2, kv, d)
    out = paged_attention(q, new_kv[:, 0], new_kv[:, 1], kv_cache, plan, HEAD_DIM**-0.5)
    expected = torch.cat(
        [_reference(q[i : i + 1], kv[:, 0], kv[:, 1], window) for i, kv in enumerate(context)]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_fused_kernel_dequantizes_byte_caches_in_place(
    kv_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused kernel on int8 / fp8 blocks equals attention over their dequantized copies,
    whatever code this CPU gets (the speed gate is forced open)."""
    from kvserve.model import fused_attention

    monkeypatch.setattr(fused_attention, "_cpu_vectorizes_bytes", lambda: True)
    generator = torch.Generator().manual_seed(3)
    layer = quant.allocate_layer(
        NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, kv_dtype, torch.device("cpu")
    )
    k, v = torch.randn(2, NUM_BLOCKS * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    quant.write_layer(layer, k, v, torch.arange(NUM_BLOCKS * BLOCK_SIZE))
    block_ids = torch.tensor([[3, 7, 1], [5, 2, 0]])  # the second seq: 2 blocks + padding
    mask = torch.ones(2, 3 * BLOCK_SIZE, dtype=torch.bool)
    mask[1, 2 * BLOCK_SIZE - 1 :] = False
    q = torch.randn(2, NUM_HEADS, HEAD_DIM, generator=generator)
    out = fused_attention.fused_decode_attention(q, layer, block_ids, mask, HEAD_DIM**-0.5)
    for row in range(2):
        keys = quant.read_blocks(layer.k, layer.k_scale, block_ids[row], torch.float32)
        values = quant.read_blocks(layer.v, layer.v_scale, block_ids[row], torch.float32)
        length = int(mask[row].sum())
        expected = _reference(
            q[row : row + 1], keys.flatten(0, 1)[:length], values.flatten(0, 1)[:length], None
        )  # one query at the last position: it sees all `length` keys
        torch.testing.assert_close(out[row : row + 1], expected, rtol=0, atol=1e-5)


def test_byte_caches_go_fused_only_where_inductor_vectorizes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch._inductor.config as inductor_config

    from kvserve.model.fused_attention import fused_reads

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert fused_reads(torch.float32, cpu) and fused_reads(torch.bfloat16, cpu)
    assert not fused_reads(torch.int8, cpu) and not fused_reads(torch.float8_e4m3fn, cpu)
    assert fused_reads(torch.int8, cuda)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert fused_reads(torch.int8, cpu) and fused_reads(torch.float8_e4m3fn, cpu)
    monkeypatch.setattr(inductor_config.cpp, "simdlen", 256)  # AVX2 code on an AVX-512 CPU
    assert not fused_reads(torch.int8, cpu)
    assert not fused_reads(torch.uint8, cpu) and not fused_reads(torch.uint8, cuda)  # int4
