"""Turns a `SchedulerOutput` into tensors, runs the model, samples. Tensors live only here.

One step's batch is flat: the scheduled requests' new tokens laid end to end (decodes first).

    input_ids:  [ d0 | d1 | d2 | p0 p0 p0 p0 | p1 p1 ]     num_tokens = 9
    query_start_loc: 0    1    2    3           7     9
    logits_indices:  0    1    2             6     8    (last row of each sampled request)
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch

from kvserve.engine.compiled_decode import CompiledDecode
from kvserve.engine.prompt_logprobs import compute_prompt_logprobs
from kvserve.engine.sampler import Sampler
from kvserve.engine.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from kvserve.kv.kv_cache import KVCaches, allocate_kv_caches, copy_blocks
from kvserve.kv.kv_connector import KVConnector, NoKVConnector
from kvserve.kv.quant import storage_dtype
from kvserve.model.attention import (
    AttentionBackend,
    AttentionMetadata,
    TorchSDPABackend,
    select_attention_backend,
)
from kvserve.model.config import ModelConfig
from kvserve.model.loader import CausalLM, load_model


class StepInputs(NamedTuple):
    input_ids: torch.Tensor  # (num_tokens,)
    positions: torch.Tensor  # (num_tokens,)
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # (num_sampled,)


class ModelRunner:
    """Owns the model, the physical KV cache, the sampler and the KV connector (the worker
    half: loads and saves the step's blocks, see kv/kv_connector.py); makes no policy
    decisions."""

    def __init__(
        self,
        model_path: str,
        dtype: str,
        device: str,
        seed: int,
        weight_format: str = "auto",
    ) -> None:
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.model: CausalLM = load_model(model_path, self.dtype, self.device, weight_format)
        self.model_config: ModelConfig = self.model.config
        self.sampler = Sampler(seed=seed, device=self.device)
        self.kv_caches: KVCaches | None = None
        self.block_size = 0
        self.compiled: CompiledDecode | None = None
        self.connector: KVConnector = NoKVConnector()
        self.attention_backend: AttentionBackend[Any] = TorchSDPABackend()

    def initialize_kv_cache(
        self,
        num_blocks: int,
        block_size: int,
        kv_cache_dtype: str,
        attention_backend: str,
        compiled: bool = False,
        connector: KVConnector | None = None,
    ) -> None:
        """Allocate the whole KV pool once and choose the attention backend, once, for this
        cache and `--attention-backend` (`compiled`: decode steps will be compiled, see
        `compile_decode`). `num_blocks == 0` runs without a cache (and with SDPA). The
        `connector` (None: none) moves blocks in and out of this pool."""
        self.block_size = block_size
        if num_blocks == 0:
            self.kv_caches = None
            return
        config = self.model_config
        cache_dtype = storage_dtype(kv_cache_dtype, self.dtype)
        self.kv_caches = allocate_kv_caches(
            num_layers=config.num_hidden_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dtype=cache_dtype,
            device=self.device,
        )
        if connector is not None:
            self.connector = connector
            connector.register_kv_caches(self.kv_caches)
        self.attention_backend = select_attention_backend(
            attention_backend,
            compiled=compiled,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            cache_dtype=cache_dtype,
            model_dtype=self.dtype,
            device=self.device,
        )

    @torch.inference_mode()
    def compile_decode(self, sizes: tuple[int, ...]) -> None:
        """Compile decode steps for these batch sizes now (see compiled_decode.py), with the
        backend `initialize_kv_cache(..., compiled=True)` chose."""
        if self.kv_caches is None:
            raise ValueError("compile: needs a KV cache (cache_mode paged or contiguous)")
        self.compiled = CompiledDecode(self.model, sizes, self.attention_backend)
        self.compiled.warmup(self.kv_caches, self.block_size, self.device)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step: blocks to swap out, blocks to load, copy-on-write copies, forward,
        blocks to save, logits of sampled rows, sampling, and the logprobs of the prompt
        positions the scheduler named (prompt_logprobs.py). Swap-outs, loads and saves go
        through the connector; empty orders (always, without a tier) skip it. Swap-outs come
        first: their blocks were freed while scheduling and may be loaded into, copied into
        or written by this step. The forward's time goes to the connector too."""
        kv_caches = self.kv_caches
        if kv_caches is not None:
            if scheduler_output.blocks_to_swap_out:
                self.connector.save_blocks(kv_caches, scheduler_output.blocks_to_swap_out)
            if scheduler_output.blocks_to_load:
                self.connector.load_blocks(kv_caches, scheduler_output.blocks_to_load)
            copy_blocks(kv_caches, scheduler_output.block_copies)
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return ModelRunnerOutput()
        inputs = self.prepare_inputs(scheduled)
        sampled = [r for r in scheduled if r.sample]
        start = time.perf_counter()
        hidden, logits = self._forward(inputs, is_decode=len(sampled) == len(inputs.input_ids))
        self.connector.record_forward(  # the measured prefill cost, for restore decisions
            len(inputs.input_ids), inputs.attn_metadata.num_decodes, time.perf_counter() - start
        )
        if kv_caches is not None and scheduler_output.blocks_to_save:
            self.connector.save_blocks(kv_caches, scheduler_output.blocks_to_save)
        prompt_logprobs = (
            {}  # an all-decode step: every row samples, none scores a prompt token
            if hidden is None
            else compute_prompt_logprobs(
                self.model, hidden, scheduled, inputs.attn_metadata.query_start_loc
            )
        )
        if not sampled:
            return ModelRunnerOutput(prompt_logprobs=prompt_logprobs)
        result = self.sampler(logits, sampled, scheduler_output.grammar_bitmask)
        return ModelRunnerOutput(
            request_ids=[r.request_id for r in sampled],
            sampled_token_ids=result.token_ids,
            logprobs=result.logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def _forward(
        self, inputs: StepInputs, is_decode: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Hidden states of every row (num_tokens, hidden) and logits of the sampled rows
        (num_sampled, vocab). An all-decode step that fits a compiled bucket returns only
        its logits (hidden None)."""
        compiled = self.compiled
        if is_decode and compiled is not None and compiled.bucket_for(len(inputs.input_ids)):
            assert self.kv_caches is not None
            return None, compiled.run(
                inputs.input_ids, inputs.positions, inputs.attn_metadata, self.kv_caches
            )  # (num_decodes, vocab)
        if compiled is not None and len(inputs.input_ids) >= 2:  # prefill, mixed, big decode
            assert self.kv_caches is not None
            hidden = compiled.run_hidden(
                inputs.input_ids, inputs.positions, inputs.attn_metadata, self.kv_caches
            )  # (num_tokens, hidden)
        else:
            hidden = self.model(
                inputs.input_ids, inputs.positions, inputs.attn_metadata, self.kv_caches
            )  # (num_tokens, hidden)
        return hidden, self.model.compute_logits(hidden[inputs.logits_indices])

    def prepare_inputs(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        """Build every per-step tensor once, from Python lists."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_start_loc = [0]
        logits_indices: list[int] = []
        for entry in scheduled:
            input_ids.extend(entry.token_ids)
            positions.extend(range(entry.num_computed_tokens, entry.seq_len))
            query_start_loc.append(len(input_ids))
            if entry.sample:
                logits_indices.append(len(input_ids) - 1)
        metadata = AttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=[entry.seq_len for entry in scheduled],
            num_decodes=sum(1 for entry in scheduled if entry.num_new_tokens == 1),
            slot_mapping=self._slot_mapping(scheduled),
            block_tables=self._block_tables(scheduled),
            block_size=self.block_size,
            backend=self.attention_backend,
        )
        return StepInputs(
            input_ids=self._tensor(input_ids),  # (num_tokens,)
            positions=self._tensor(positions),  # (num_tokens,)
            attn_metadata=metadata,
            logits_indices=self._tensor(logits_indices),  # (num_sampled,)
        )

    def _slot_mapping(self, scheduled: list[ScheduledRequest]) -> torch.Tensor | None:
        if self.kv_caches is None:
            return None
        block_size = self.block_size
        slots: list[int] = []
        for entry in scheduled:
            for position in range(entry.num_computed_tokens, entry.seq_len):
                block_id = entry.block_ids[position // block_size]
                slots.append(block_id * block_size + position % block_size)
        return self._tensor(slots)  # (num_tokens,)

    def _block_tables(self, scheduled: list[ScheduledRequest]) -> torch.Tensor | None:
        if self.kv_caches is None:
            return None
        width = max(len(entry.block_ids) for entry in scheduled)
        rows = [entry.block_ids + [0] * (width - len(entry.block_ids)) for entry in scheduled]
        return self._tensor(rows)  # (num_seqs, max_blocks_per_seq)

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
