"""One layer's decode attention over int8 / fp8 blocks: fused in place vs gather + SDPA.

    .venv/bin/python scripts/byte_cache_attention.py [--simdlen 256] [--seqs 16 --tokens 320]

The default model's attention shapes (3 KV heads, 9 query heads, head_dim 64, blocks of 16).
Times, per storage dtype, kvserve's fused kernel (`fused_attention._decode_reduction`,
compiled by inductor) and the gather path (`quant.read_blocks` + SDPA, eager), and prints the
largest difference between the two. `--simdlen 256` makes inductor emit AVX2 code on an
AVX-512 CPU, to see what a CPU without AVX-512 gets (`fused_reads` keeps int8 and fp8 off the
fused kernel there).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvserve.kv import quant
from kvserve.model import fused_attention

KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 3, 3, 64, 16, 3000


def timed(fn: Callable[[], torch.Tensor], iters: int = 50) -> tuple[float, torch.Tensor]:
    """Median-free mean ms per call after 5 warm-up calls, and the last output."""
    with torch.inference_mode():
        for _ in range(5):
            out = fn()
        start = time.perf_counter()
        for _ in range(iters):
            out = fn()
        return 1000 * (time.perf_counter() - start) / iters, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=320, help="context per seq")
    parser.add_argument("--simdlen", type=int, default=None, help="inductor's vector width")
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    import torch._inductor.config as inductor_config

    inductor_config.cpp.simdlen = args.simdlen
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, simdlen {args.simdlen}")
    generator = torch.Generator().manual_seed(0)
    num_blocks = -(-args.tokens // BLOCK_SIZE)
    block_ids = torch.randint(1, NUM_BLOCKS, (args.seqs, num_blocks), generator=generator)
    mask = torch.ones(args.seqs, num_blocks * BLOCK_SIZE, dtype=torch.bool)
    q = torch.randn(args.seqs, KV_HEADS * GROUP, HEAD_DIM, generator=generator)
    scale = HEAD_DIM**-0.5
    reduction = torch.compile(fused_attention._decode_reduction, dynamic=False)
    for dtype in (torch.float32, torch.int8, torch.float8_e4m3fn):
        layer = quant.allocate_layer(
            NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype, torch.device("cpu")
        )
        k, v = torch.randn(2, NUM_BLOCKS * BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator)
        quant.write_layer(layer, k, v, torch.arange(NUM_BLOCKS * BLOCK_SIZE))

        def gather(layer: quant.LayerKV = layer) -> torch.Tensor:
            keys = quant.read_blocks(layer.k, layer.k_scale, block_ids, torch.float32)
            values = quant.read_blocks(layer.v, layer.v_scale, block_ids, torch.float32)
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2),
                keys.flatten(1, 2).transpose(1, 2),
                values.flatten(1, 2).transpose(1, 2),
                attn_mask=mask[:, None, None, :],
                scale=scale,
                enable_gqa=True,
            )
            return out.squeeze(2)

        fused_ms, fused_out = timed(lambda layer=layer: reduction(q, layer, block_ids, mask, scale))
        gather_ms, gather_out = timed(gather)
        diff = (fused_out - gather_out).abs().max().item()
        print(
            f"{str(dtype).removeprefix('torch.'):>14}: fused {fused_ms:6.3f} ms, "
            f"gather + SDPA {gather_ms:6.3f} ms, max difference {diff:.1e}"
        )


if __name__ == "__main__":
    main()
