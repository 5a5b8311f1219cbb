"""Decode steps through torch.compile: model + LM head as one graph per batch-size bucket.

On these CPUs the matmul backend decides decode speed (DESIGN.md §9): inductor's C++ GEMM on
frozen, prepacked weights streams them far faster than MKL does for a few rows. The graph
sees only a padded decode batch's (input_ids, positions); attention is the opaque
`kvserve::attention` op, which finds the step's plans and caches through `attention_step`, so
no variable-shape metadata enters the graph and nothing recompiles once a bucket is built.

    5 decode rows, buckets (1, 2, 4, 8, ...):
    bucket 8:  [ r0 r1 r2 r3 r4 | p  p  p ]   padding rows: token 0 at position 0, written to
                                              slot 0 (the null block), attending to it alone;
                                              their logits are dropped

Every other step (prefill chunks, prefills mixed with decodes, decode batches above the
largest bucket) runs through a second graph compiled once with a dynamic token count
(`run_hidden`): its GEMMs stay ATen's, which are already at this CPU's limit for many rows,
and the norms, RoPE, activations and residual adds between them fuse.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvserve.engine.compile_cache import (
    compile_cache_counts,
    frozen_graph_cache,
    log_compile_cache_use,
    use_compile_cache_dir,
)
from kvserve.engine.decode_chunks import cheapest_chunks
from kvserve.kv.kv_cache import KVCaches
from kvserve.model.attention import AttentionBackend, AttentionMetadata, attention_step
from kvserve.model.layers import CausalLM

logger = logging.getLogger("kvserve")

# Inductor's own C++ GEMM over frozen (constant, prepacked) weights. Forcing the CPP backend
# matters: left to choose, autotuning on a busy machine picks MKL and caches that choice on
# disk (measured: 1.0-1.3x over eager instead of 1.6-3.4x; docs/benchmarks.md). Applied as a
# config patch around each call (compilation happens inside the first call of a shape):
# passed as torch.compile(options=...), freezing is silently not applied.
INDUCTOR_CONFIG: dict[str, Any] = {
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP",
    "freezing": True,
    "cpp.weight_prepack": True,
}


class CompiledDecode:
    """Compiled decode forward for a fixed set of padded batch sizes, whose decode attention
    runs in `backend` (the runner's, chosen with compilation in mind)."""

    def __init__(
        self, model: CausalLM, sizes: tuple[int, ...], backend: AttentionBackend[Any]
    ) -> None:
        # Kernels fix their thread count when compiled: set torch's threads before this.
        self.model = model
        self.sizes = tuple(sorted(sizes))
        self.backend = backend
        self.cache_dir = use_compile_cache_dir()  # before anything compiles (compile_cache.py)
        dynamo_config: Any = torch._dynamo.config
        # Each engine adds its own entries to code objects shared by every engine of the
        # process (the decode forward per bucket, the backend's graphs per shape class and
        # cache format, the variable-length graph): raise the limit by that many, so a
        # second engine (`bench kv-dtype` builds one per dtype) does not fall back to eager.
        dynamo_config.recompile_limit += len(sizes) + backend.compiled_variants + 1
        self._inductor_config = dict(INDUCTOR_CONFIG)
        self._forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        self._forward = torch.compile(_DecodeLogits(model), dynamic=False)
        self._hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        self._hidden = torch.compile(_Hidden(model), dynamic=None)
        self._costs: dict[int, float] = {}  # bucket -> seconds a step, measured in warmup
        self._chunk_plans: dict[int, list[int]] = {}  # num_rows -> chunks_for's answer

    def bucket_for(self, num_rows: int) -> int | None:
        """The smallest compiled size that holds num_rows, or None when none does."""
        return next((size for size in self.sizes if size >= num_rows), None)

    def chunks_for(self, num_rows: int) -> list[int]:
        """The buckets that run a decode batch of num_rows, cheapest by the measured bucket
        costs: one bucket padded, or several in turn (each padded only in the last).

        Above ~16 rows a decode step is compute-bound on a CPU, so padding 36 rows to 64
        costs nearly 64 rows; 32 + 4 costs two weight reads but 28 rows less arithmetic.
        Before `warmup` measures the costs, always the one smallest bucket that fits.
        """
        if not self._costs:
            bucket = self.bucket_for(num_rows)
            assert bucket is not None
            return [bucket]
        plan = self._chunk_plans.get(num_rows)
        if plan is None:
            plan = self._chunk_plans[num_rows] = cheapest_chunks(self._costs, num_rows)
        return plan

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        md: AttentionMetadata,
        kv_caches: KVCaches,
        bucket: int | None = None,
    ) -> torch.Tensor:
        """Logits (num_rows, vocab) of a decode-only step: padded to `bucket` if given, else
        in the chunks `chunks_for` picks (the caller checks `bucket_for` first)."""
        num_rows = input_ids.shape[0]
        if bucket is None:
            chunks = self.chunks_for(num_rows)
            if len(chunks) > 1:
                return self._run_chunks(input_ids, positions, md, kv_caches, chunks)
            bucket = chunks[0]
        assert bucket >= num_rows
        padded = _pad_metadata(md, bucket - num_rows)
        plans = self.model.plan_layers(padded, True, input_ids.device)
        zeros = torch.zeros(bucket - num_rows, dtype=torch.long, device=input_ids.device)
        with (
            attention_step(plans, kv_caches),  # type: ignore[arg-type]
            torch._inductor.config.patch(self._inductor_config),
        ):
            logits = self._forward(torch.cat([input_ids, zeros]), torch.cat([positions, zeros]))
        return logits[:num_rows]  # (num_rows, vocab)

    def _run_chunks(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        md: AttentionMetadata,
        kv_caches: KVCaches,
        chunks: list[int],
    ) -> torch.Tensor:
        """Rows [0, c0), [c0, c0 + c1), ... each through its bucket; logits concatenated."""
        logits, start = [], 0
        for bucket in chunks:
            end = min(start + bucket, input_ids.shape[0])
            part = _slice_decodes(md, start, end)
            logits.append(
                self.run(input_ids[start:end], positions[start:end], part, kv_caches, bucket)
            )
            start = end
        return torch.cat(logits)  # (num_rows, vocab)

    def run_hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        md: AttentionMetadata,
        kv_caches: KVCaches,
    ) -> torch.Tensor:
        """Hidden states (num_tokens, hidden) of any step of two or more tokens (prefill
        chunks, mixed steps, decode batches above the largest bucket): one graph whose
        token count is dynamic; GEMMs stay ATen's, the ops between them fuse."""
        assert input_ids.shape[0] >= 2
        plans = self.model.plan_layers(md, True, input_ids.device)
        torch._dynamo.maybe_mark_dynamic(input_ids, 0)
        torch._dynamo.maybe_mark_dynamic(positions, 0)
        with attention_step(plans, kv_caches):  # type: ignore[arg-type]
            return self._hidden(input_ids, positions)  # (num_tokens, hidden)

    def warmup(self, kv_caches: KVCaches, block_size: int, device: torch.device) -> None:
        """Compile every bucket now (a minute each; seconds from the compile cache), then what
        the attention backend compiles, then the variable-length graph, so no request waits."""
        empty = torch.zeros(0, dtype=torch.long, device=device)  # (0,)
        md = self._metadata(0, block_size, device)
        before = compile_cache_counts()
        with frozen_graph_cache(self.model):
            for size in self.sizes:
                self._compile_bucket(size, empty, md, kv_caches)
        self._measure_costs(empty, md, kv_caches)
        start = time.perf_counter()
        config = self.model.config
        dtype = self.model.activation_dtype
        self.backend.warmup(config.num_attention_heads, config.head_dim, dtype, kv_caches[0])
        logger.info(
            "%s decode attention ready in %.1f s", self.backend.name, time.perf_counter() - start
        )
        start = time.perf_counter()
        two = torch.zeros(2, dtype=torch.long, device=device)  # a 2-token prompt, null block
        self.run_hidden(two, two.clone(), self._metadata(2, block_size, device), kv_caches)
        logger.info("compiled variable-length steps in %.1f s", time.perf_counter() - start)
        log_compile_cache_use(self.cache_dir, before)

    def _compile_bucket(
        self, size: int, empty: torch.Tensor, md: AttentionMetadata, kv_caches: KVCaches
    ) -> None:
        """The first (compiling) call of one bucket, on an empty step."""
        start = time.perf_counter()
        try:
            self.run(empty, empty, md, kv_caches, bucket=size)
        except torch._inductor.exc.InductorError as error:
            # The C++ GEMM template has no kernel for some (small) shapes; inductor says
            # so only by failing. Let it choose ATen (MKL) for those.
            logger.warning(
                "compile: %s; retrying with ATen GEMMs allowed", str(error).splitlines()[0]
            )
            self._inductor_config["max_autotune_gemm_backends"] = "CPP,ATEN"
            self.run(empty, empty, md, kv_caches, bucket=size)
        logger.info("compiled decode batch %d in %.1f s", size, time.perf_counter() - start)

    def _metadata(
        self, num_tokens: int, block_size: int, device: torch.device
    ) -> AttentionMetadata:
        """An empty step (0 tokens), or one prompt of `num_tokens` all in slot 0 of the null
        block: what warmup runs."""
        num_seqs = 1 if num_tokens else 0
        num_blocks = max(1, -(-num_tokens // block_size))
        return AttentionMetadata(
            query_start_loc=[0, num_tokens] if num_seqs else [0],
            seq_lens=[num_tokens] if num_seqs else [],
            num_decodes=0,
            slot_mapping=torch.zeros(num_tokens, dtype=torch.long, device=device),  # (T,)
            block_tables=torch.zeros((num_seqs, num_blocks), dtype=torch.long, device=device),
            block_size=block_size,
            backend=self.backend,
        )

    def _measure_costs(
        self, empty: torch.Tensor, md: AttentionMetadata, kv_caches: KVCaches
    ) -> None:
        """Seconds of one step per bucket (the best of 3, on null-block rows), for
        `chunks_for`."""
        for size in self.sizes:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                self.run(empty, empty, md, kv_caches, bucket=size)
                times.append(time.perf_counter() - start)
            self._costs[size] = min(times)
        self._chunk_plans.clear()
        logger.info(
            "decode step ms per bucket: %s",
            ", ".join(f"{size}: {1000 * cost:.0f}" for size, cost in self._costs.items()),
        )


class _DecodeLogits(nn.Module):
    """The compiled region. A module (not a function) so that freezing sees the model's
    weights as parameters and folds them into prepacked constants."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids, positions, None, None)  # (bucket, hidden)
        return self.model.compute_logits(hidden)  # (bucket, vocab)


class _Hidden(nn.Module):
    """The variable-length compiled region: the model without its LM head."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.model(input_ids, positions, None, None)
        return hidden  # (num_tokens, hidden)


def _slice_decodes(md: AttentionMetadata, start: int, end: int) -> AttentionMetadata:
    """The decode rows [start, end) of a decode-only step's metadata."""
    assert md.slot_mapping is not None and md.block_tables is not None
    return dataclasses.replace(
        md,
        query_start_loc=list(range(end - start + 1)),
        seq_lens=md.seq_lens[start:end],
        num_decodes=end - start,
        slot_mapping=md.slot_mapping[start:end],
        block_tables=md.block_tables[start:end],
    )


def _pad_metadata(md: AttentionMetadata, pad: int) -> AttentionMetadata:
    """Append `pad` one-token decode rows that live in slot 0 of the null block."""
    if pad == 0:
        return md
    assert md.slot_mapping is not None and md.block_tables is not None
    device = md.slot_mapping.device
    num_rows = len(md.seq_lens)
    width = md.block_tables.shape[1]
    return dataclasses.replace(
        md,
        query_start_loc=list(range(num_rows + pad + 1)),
        seq_lens=md.seq_lens + [1] * pad,
        num_decodes=num_rows + pad,
        slot_mapping=torch.cat(
            [md.slot_mapping, torch.zeros(pad, dtype=torch.long, device=device)]
        ),  # (bucket,)
        block_tables=torch.cat(
            [md.block_tables, torch.zeros((pad, width), dtype=torch.long, device=device)]
        ),  # (bucket, max_blocks)
    )
