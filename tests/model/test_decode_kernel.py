"""kvserve's C++ decode attention (kvserve/kernels) against a naive reference, and through
`paged_attention` against the SDPA path."""

from __future__ import annotations

import pytest
import torch

from kvserve import kernels
from kvserve.kv import quant
from kvserve.model.attention import (
    AttentionMetadata,
    CppDecodeBackend,
    TorchSDPABackend,
    paged_attention,
    plan_attention,
)
from tests.helpers import decode_kernel_expected

CPU = torch.device("cpu")


def _built(cache_dtype: torch.dtype = torch.float32) -> object:
    """The kernel module. On x86 with AVX2 or AVX-512 (every machine this project runs on)
    it must build: a failed build is a test failure, not a skip."""
    module = kernels.decode_attention_kernel(cache_dtype)
    if module is None:
        assert not decode_kernel_expected()
        pytest.skip(f"no kernel build for {torch.backends.cpu.get_cpu_capability()}")
    return module


def _reference(q, keys, values, window, scale):  # q (h, d); keys, values (k_len, kv, d)
    groups = q.shape[0] // keys.shape[1]
    start = 0 if window is None else max(0, keys.shape[0] - window)
    k = keys[start:].repeat_interleave(groups, dim=1)  # (k, h, d)
    v = values[start:].repeat_interleave(groups, dim=1)  # (k, h, d)
    weights = (torch.einsum("hd,khd->hk", q, k) * scale).softmax(-1)  # (h, k)
    return torch.einsum("hk,khd->hd", weights, v)  # (h, d)


def _pool(seq_lens, block_size, kv_heads, head_dim, generator, dtype=torch.float32):
    """A shuffled block pool (quant.LayerKV in `dtype`) holding one random context per seq,
    and zero-padded tables."""
    counts = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(counts) + 3
    ids = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    layer = quant.allocate_layer(num_blocks, block_size, kv_heads, head_dim, dtype, CPU)
    k, v = torch.randn(2, num_blocks * block_size, kv_heads, head_dim, generator=generator)
    quant.write_layer(layer, k, v, torch.arange(num_blocks * block_size))
    tables, start = [], 0
    for count in counts:
        tables.append(ids[start : start + count])
        start += count
    width = max(counts) + 1  # one column of padding past the longest
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return layer, tables, table


def _context(data, scale, table, length):  # (length, kv_heads, head_dim) as stored, in fp32
    blocks = quant.read_blocks(data, scale, torch.tensor(table), torch.float32)
    return blocks.flatten(0, 1)[:length]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (4, 4, 128), (8, 1, 32), (16, 2, 16)],
    ids=["gqa3-d64", "mha-d128", "mqa8-d32", "gqa8-d16"],
)
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_matches_reference(
    heads: int, kv_heads: int, head_dim: int, block_size: int, window: int | None
) -> None:
    module = _built()
    assert module.supports(heads, kv_heads, head_dim)  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(block_size + head_dim)
    seq_lens = [1, 15, 16, 17, 70, 33, 100]  # one token, block edges, many blocks
    layer, tables, table = _pool(seq_lens, block_size, kv_heads, head_dim, generator)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=generator)
    scale = head_dim**-0.5
    out = kernels.paged_decode_attention(q, layer, table, seq_lens, window, scale)
    for row, (length, blocks) in enumerate(zip(seq_lens, tables, strict=True)):
        keys = _context(layer.k, None, blocks, length)
        values = _context(layer.v, None, blocks, length)
        expected = _reference(q[row], keys, values, window, scale)
        torch.testing.assert_close(out[row], expected, rtol=0, atol=2e-5)
    if window is not None:  # blocks wholly before the window may be gone (null block 0)
        dropped = table.clone()
        for row, length in enumerate(seq_lens):
            dropped[row, : max(0, length - window) // block_size] = 0
        again = kernels.paged_decode_attention(q, layer, dropped, seq_lens, window, scale)
        assert torch.equal(again, out)


@pytest.mark.parametrize("block_size", [16, 48])
@pytest.mark.parametrize("window", [None, 20, 300])
def test_long_seqs_in_key_chunks_match_reference(block_size: int, window: int | None) -> None:
    """Seqs past 256 keys are attended in chunks of 256 positions merged at the end: chunk
    edges on and off block edges (block 48), windows inside one chunk and across several."""
    _built()
    generator = torch.Generator().manual_seed(block_size)
    seq_lens = [255, 256, 257, 300, 513, 1000]
    layer, tables, table = _pool(seq_lens, block_size, 3, 64, generator)
    q = torch.randn(len(seq_lens), 9, 64, generator=generator)
    out = kernels.paged_decode_attention(q, layer, table, seq_lens, window, 0.125)
    for row, (length, blocks) in enumerate(zip(seq_lens, tables, strict=True)):
        keys = _context(layer.k, None, blocks, length)
        values = _context(layer.v, None, blocks, length)
        expected = _reference(q[row], keys, values, window, 0.125)
        torch.testing.assert_close(out[row], expected, rtol=0, atol=2e-5)


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512", reason="AVX2 code runs on AVX-512 only"
)
def test_avx2_build_on_an_avx512_cpu_matches_reference() -> None:
    """The AVX2 build (8 lanes: other lane sums, other chunk merges) is what AVX2 machines
    run; on an AVX-512 machine it is built and checked here too."""
    module = kernels.decode_attention_kernel(torch.float32, "AVX2")
    assert module is not None and module is not _built()
    generator = torch.Generator().manual_seed(2)
    seq_lens = [1, 17, 130, 257, 700]
    layer, tables, table = _pool(seq_lens, 16, 2, 32, generator)
    q = torch.randn(len(seq_lens), 8, 32, generator=generator)
    for window in (None, 150):
        out = module.paged_decode_attention(
            q, layer.k, layer.v, None, None, table, seq_lens, window or 0, 0.2
        )  # fmt: skip
        for row, (length, blocks) in enumerate(zip(seq_lens, tables, strict=True)):
            keys = _context(layer.k, None, blocks, length)
            values = _context(layer.v, None, blocks, length)
            expected = _reference(q[row], keys, values, window, 0.2)
            torch.testing.assert_close(out[row], expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("num_threads", [1, 3])
def test_kernel_work_split_does_not_change_results(num_threads: int) -> None:
    """One item per seq and chunk (at least twice as many seqs as threads) or one per KV head
    and chunk (fewer): the same numbers, bit for bit, at any thread count."""
    _built()
    generator = torch.Generator().manual_seed(8)
    seq_lens = [5, 40, 17, 640, 33, 1, 290, 50]
    layer, _, table = _pool(seq_lens, 16, 3, 64, generator)
    q = torch.randn(len(seq_lens), 9, 64, generator=generator)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(num_threads)
        batch = kernels.paged_decode_attention(q, layer, table, seq_lens, None, 0.125)
        alone = torch.cat(
            [
                kernels.paged_decode_attention(
                    q[i : i + 1], layer, table[i : i + 1], seq_lens[i : i + 1], None, 0.125
                )
                for i in range(len(seq_lens))
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert torch.equal(batch, alone)


@pytest.mark.parametrize(
    "cache_dtype", [torch.float16, torch.bfloat16, torch.int8], ids=["fp16", "bf16", "int8"]
)
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_reads_narrow_caches(
    cache_dtype: torch.dtype, block_size: int, window: int | None
) -> None:
    """fp16 / bf16 blocks widened as they load, int8 blocks times their per-token scales:
    equal to attention over the dequantized copies."""
    _built(cache_dtype)
    generator = torch.Generator().manual_seed(4)
    seq_lens = [1, 16, 17, 70, 33]
    layer, tables, table = _pool(seq_lens, block_size, 3, 64, generator, cache_dtype)
    assert (layer.k_scale is not None) == (cache_dtype == torch.int8)
    q = torch.randn(len(seq_lens), 9, 64, generator=generator)
    out = kernels.paged_decode_attention(q, layer, table, seq_lens, window, 0.125)
    for row, (length, blocks) in enumerate(zip(seq_lens, tables, strict=True)):
        keys = _context(layer.k, layer.k_scale, blocks, length)
        values = _context(layer.v, layer.v_scale, blocks, length)
        expected = _reference(q[row], keys, values, window, 0.125)
        torch.testing.assert_close(out[row], expected, rtol=0, atol=2e-5)


def test_kernel_refuses_what_it_cannot_read() -> None:
    module = _built()
    generator = torch.Generator().manual_seed(0)
    layer, _, table = _pool([20, 5], 16, 2, 32, generator)
    q = torch.randn(2, 4, 32, generator=generator)
    attend = kernels.paged_decode_attention
    with pytest.raises(RuntimeError, match="outside the block table"):
        attend(q, layer, table, [20, 16 * table.shape[1] + 1], None, 1.0)
    bad = table.clone()
    bad[1, 0] = layer.k.shape[0]
    with pytest.raises(RuntimeError, match="block id out of range"):
        attend(q, layer, bad, [20, 5], None, 1.0)
    float32_build = module.paged_decode_attention  # type: ignore[attr-defined]
    half = layer.k.half(), layer.v.half()
    with pytest.raises(RuntimeError, match="reads Float caches"):
        float32_build(q, *half, None, None, table, [20, 5], 0, 1.0)
    scale = torch.ones(layer.k.shape[:3])
    with pytest.raises(RuntimeError, match="scales go with int8"):
        float32_build(q, layer.k, layer.v, scale, scale, table, [20, 5], 0, 1.0)
    assert not module.supports(18, 2, 32)  # type: ignore[attr-defined]  # 9 per KV head
    assert not module.supports(4, 2, 24)  # type: ignore[attr-defined]  # not whole vectors
    assert not kernels.decode_kernel_applies(4, 2, 32, torch.float8_e4m3fn, CPU)
    assert not kernels.decode_kernel_applies(4, 2, 32, torch.uint8, CPU)  # int4
    assert not kernels.decode_kernel_applies(4, 2, 32, torch.float32, torch.device("cuda"))
    assert kernels.decode_kernel_applies(4, 2, 32, torch.float32, CPU)


@pytest.mark.parametrize("window", [None, 6])
def test_paged_attention_with_the_kernel_equals_sdpa(window: int | None) -> None:
    """A mixed step (3 decodes, a prefill chunk, a whole prompt): the kernel plan attends the
    decodes in one call, and every row equals the SDPA path's."""
    _built()
    generator = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, block_size = 6, 2, 32, 4
    num_cached, q_lens = [9, 2, 22, 6, 0], [1, 1, 1, 4, 5]
    seq_lens = [c + n for c, n in zip(num_cached, q_lens, strict=True)]
    counts = [-(-n // block_size) for n in seq_lens]
    ids = (torch.randperm(40, generator=generator) + 1).tolist()
    tables, start = [], 0
    for count in counts:
        tables.append(ids[start : start + count])
        start += count
    layer = quant.allocate_layer(41, block_size, kv_heads, head_dim, torch.float32, CPU)
    layer.k.normal_(generator=generator)
    layer.v.normal_(generator=generator)
    slots = [
        table[p // block_size] * block_size + p % block_size
        for table, c, n in zip(tables, num_cached, q_lens, strict=True)
        for p in range(c, c + n)
    ]
    width = max(counts)
    outputs = []
    for backend in (TorchSDPABackend(), CppDecodeBackend()):
        md = AttentionMetadata(
            query_start_loc=[0, 1, 2, 3, 7, 12],
            seq_lens=seq_lens,
            num_decodes=3,
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
            block_size=block_size,
            backend=backend,
        )
        plan = plan_attention(md, window, cached=True, device=CPU)
        assert plan.backend is backend and plan.num_decodes == 3
        q = torch.randn(12, heads, head_dim, generator=torch.Generator().manual_seed(1))
        k, v = torch.randn(2, 12, kv_heads, head_dim, generator=torch.Generator().manual_seed(2))
        outputs.append(paged_attention(q, k, v, layer, plan, head_dim**-0.5))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=2e-5)
