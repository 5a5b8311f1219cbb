"""Decode attention over float32 blocks, three ways: kvserve's C++ kernel, inductor's fused
kernel, gather + SDPA.

    .venv/bin/python scripts/decode_attention_kernels.py [--seqs 64] [--min-len 330 --max-len 640]

The default model's attention shapes (3 KV heads, 9 query heads, head_dim 64, blocks of 16),
a pool of 4,000 blocks per layer and 30 layers, each seq's blocks scattered through the pool,
as a running engine has them: one pass over the layers reads ~1.4 GB at the defaults, far
beyond the CPU's caches. Prints ms per layer call, the K/V read rate it implies, and the
largest difference from gather + SDPA. Every kernel attends all seqs in one call; the
engine's torch path also groups seqs by length (`DecodePlan`), which this does not.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvserve import kernels
from kvserve.kv import quant
from kvserve.model import fused_attention

KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS, NUM_LAYERS = 3, 3, 64, 16, 4000, 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=330)
    parser.add_argument("--max-len", type=int, default=640)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3, help="passes over the layers")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    generator = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.seqs,), generator=generator)
    seq_lens = lens.tolist()
    width = -(-max(seq_lens) // BLOCK_SIZE)
    assert args.seqs * width < NUM_BLOCKS, "more blocks than the pool holds"
    ids = torch.randperm(NUM_BLOCKS - 1, generator=generator) + 1
    table = torch.zeros(args.seqs, width, dtype=torch.long)
    start = 0
    for row, length in enumerate(seq_lens):
        count = -(-length // BLOCK_SIZE)
        table[row, :count] = ids[start : start + count]
        start += count
    mask = torch.arange(width * BLOCK_SIZE)[None, :] < lens[:, None]  # (seqs, width * bs)
    layers = []
    for _ in range(NUM_LAYERS):
        layer = quant.allocate_layer(
            NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu")
        )
        layer.k.normal_(generator=generator)
        layer.v.normal_(generator=generator)
        layers.append(layer)
    q = torch.randn(args.seqs, KV_HEADS * GROUP, HEAD_DIM, generator=generator)
    scale = HEAD_DIM**-0.5
    read_bytes = sum(seq_lens) * KV_HEADS * HEAD_DIM * 4 * 2  # K and V, one layer

    def gather_sdpa(layer: quant.LayerKV) -> torch.Tensor:
        keys = quant.read_blocks(layer.k, None, table, torch.float32).flatten(1, 2)
        values = quant.read_blocks(layer.v, None, table, torch.float32).flatten(1, 2)
        return F.scaled_dot_product_attention(
            q.unsqueeze(2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        ).squeeze(2)

    candidates: dict[str, Callable[[quant.LayerKV], torch.Tensor]] = {
        "gather + SDPA": gather_sdpa,
        "inductor fused": lambda layer: fused_attention.fused_decode_attention(
            q, layer, table, mask, scale
        ),
    }
    if kernels.decode_attention_kernel() is not None:
        candidates["kvserve C++"] = lambda layer: kernels.paged_decode_attention(
            q, layer, table, seq_lens, None, scale
        )
    print(
        f"{args.seqs} seqs of {args.min_len}-{args.max_len} tokens, {args.num_threads} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    reference = None
    with torch.inference_mode():
        for name, attend in candidates.items():
            for layer in layers[:3]:  # warm-up (and inductor's compile)
                out = attend(layer)
            begin = time.perf_counter()
            for _ in range(args.iters):
                for layer in layers:
                    out = attend(layer)
            seconds = (time.perf_counter() - begin) / (args.iters * NUM_LAYERS)
            reference = out if reference is None else reference
            diff = (out - reference).abs().max().item()
            print(
                f"{name:>15}: {seconds * 1e3:6.2f} ms a layer, "
                f"{read_bytes / seconds / 1e9:5.1f} GB/s of K/V, max diff {diff:.1e}"
            )


if __name__ == "__main__":
    main()
