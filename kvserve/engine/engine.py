"""The engine: one loop of schedule -> execute -> update, plus request intake.

prompt --tokenizer--> Request(WAITING)
Engine.step():  scheduler.schedule()          -> SchedulerOutput
                model_runner.execute(...)      -> ModelRunnerOutput
                scheduler.update_from_output() -> requests that got a token
                output_processor               -> RequestOutputs (text, logprobs, ...)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from kvserve.config import EngineConfig
from kvserve.engine.continuation import ContinuedSample, check_continuation, continue_children
from kvserve.engine.engine_config import resolve_config
from kvserve.engine.model_runner import ModelRunner
from kvserve.engine.output_processor import OutputProcessor
from kvserve.engine.prompts import PromptInput as PromptInput  # re-exported (older imports)
from kvserve.engine.prompts import TokenizedPrompt, tokenize_prompt
from kvserve.engine.prompts import check_cache_salt as check_cache_salt  # re-exported
from kvserve.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from kvserve.engine.slo import EngineLoad, StepRates
from kvserve.engine.structured_output import StructuredOutputManager
from kvserve.engine.validation import validate_request
from kvserve.kv.block_hash import BlockHashParams
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.kv_connector import ConnectorMetrics, KVConnector
from kvserve.kv.kv_events import KVEvent
from kvserve.kv.tiers.build import build_tier_connector
from kvserve.outputs import EngineMetrics, RequestOutput
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams
from kvserve.tokenizer import load_tokenizer

logger = logging.getLogger("kvserve")


class Engine:
    """A synchronous engine. `add_request` validates before any work; `step` advances all.

    `kv_connector` moves KV blocks to and from a place outside the pool (a tier, another
    engine; see kv/kv_connector.py); None: the pool is all there is.
    `block_hash_params` are what a router needs to compute this engine's block hashes from
    token ids (`BlockHashParams.block_hashes`); with `enable_kv_events`, `take_kv_events`
    says which blocks it stored and evicted since (kv/kv_events.py).
    """

    def __init__(
        self,
        config: EngineConfig,
        kv_connector: KVConnector | None = None,
        enable_kv_events: bool = False,
    ) -> None:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.model_path = _resolve_model_path(config.model)
        self.tokenizer: Any = load_tokenizer(self.model_path)
        self.model_runner = ModelRunner(
            self.model_path, config.dtype, config.device, config.seed, config.weight_format
        )
        self.model_config = self.model_runner.model_config
        self.config, num_blocks = resolve_config(config, self.model_config)
        self.block_hash_params = BlockHashParams(
            self.config.block_size, self.model_config.fingerprint, self.config.kv_cache_dtype
        )
        if kv_connector is None:  # the tiers the arguments ask for, if any
            kv_connector = build_tier_connector(
                self.block_hash_params, self.config, self.model_config.sliding_window
            )
        self.kv_connector = kv_connector
        self.model_runner.initialize_kv_cache(
            num_blocks,
            self.config.block_size,
            self.config.kv_cache_dtype,
            self.config.attention_backend,
            compiled=self.config.compile,
            connector=kv_connector,
        )
        if self.config.compile:
            self.model_runner.compile_decode(self.config.compile_sizes)
        self.kv_cache_manager = KVCacheManager(
            num_blocks,
            self.config.block_size,
            enable_prefix_caching=self.config.enable_prefix_caching,
            cache_mode=self.config.cache_mode,
            max_model_len=self.max_model_len,
            hash_extra_keys=self.block_hash_params.extra_keys,
            sliding_window=self.model_config.sliding_window,
            enable_kv_events=enable_kv_events,
            connector=kv_connector,
        )
        self.eos_token_ids = self._eos_token_ids()
        self.structured_output = StructuredOutputManager(
            self.tokenizer, self.eos_token_ids, self.model_config.vocab_size
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=self.config.max_num_seqs,
                max_num_batched_tokens=self.config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_chunked_prefill=self.config.enable_chunked_prefill,
                preemption_mode=self.config.preemption_mode,
            ),
            self.kv_cache_manager,
            self.structured_output,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.step_rates = StepRates()  # prefill rate, decode step time (engine/slo.py)

    @property
    def max_model_len(self) -> int:
        assert self.config.max_model_len is not None
        return self.config.max_model_len

    def step(self) -> list[RequestOutput]:
        """Run one step for every scheduled request; return outputs of those that advanced."""
        _, model_output, updated = self.step_model()
        stopped = self.output_processor.detokenize(updated, model_output)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return self.output_processor.make_outputs(updated)

    def step_model(self) -> tuple[SchedulerOutput, ModelRunnerOutput, list[Request]]:
        """Schedule, run the model and append the sampled tokens, without detokenizing.

        `step` builds on this; beam search drives it directly for requests it owns.
        Returns what was scheduled, the model output and the requests that got a token.
        """
        scheduler_output = self.scheduler.schedule()
        start = time.perf_counter()
        model_output = self.model_runner.execute(scheduler_output)
        self.step_rates.observe(  # the measured rates SLO admission predicts with
            scheduler_output.num_scheduled_tokens,
            sum(1 for r in scheduler_output.scheduled if r.num_new_tokens == 1),
            time.perf_counter() - start,
        )
        updated = self.scheduler.update_from_output(scheduler_output, model_output)
        return scheduler_output, model_output, updated

    def add_request(
        self,
        request_id: str,
        prompt: PromptInput | TokenizedPrompt,
        params: SamplingParams,
        arrival_time: float | None = None,
        continue_from: Sequence[ContinuedSample] | None = None,
    ) -> None:
        """Validate and queue a request; raises ValueError (naming the field) before any work.

        `prompt` is anything `tokenize` takes, or what it returned (not tokenized again); a
        dict prompt's `cache_salt` is read here and nowhere else (see `engine/prompts.py`).
        `continue_from`: the samples to run, each from the output tokens another engine
        generated (prefill/decode disaggregation; engine/continuation.py).
        """
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request_id: {request_id!r} is already running")
        text, prompt_token_ids, cache_salt = self.tokenize(prompt)
        params = self.validate(prompt_token_ids, params)
        if continue_from is not None:
            vocab_size = self.model_config.vocab_size
            check_continuation(continue_from, params, vocab_size, self.eos_token_ids)
        indices = range(params.n) if continue_from is None else [s.index for s in continue_from]
        children = [
            Request(
                request_id if params.n == 1 else f"{request_id}#{index}",
                prompt_token_ids,
                params.for_child(index) if params.n > 1 else params,
                eos_token_ids=self.eos_token_ids,
                arrival_time=arrival_time,
                cache_salt=cache_salt,
            )
            for index in indices
        ]
        self.output_processor.add_request(request_id, text, children, continue_from)
        try:
            self.structured_output.add_requests(children)
            if continue_from is not None:
                continue_children(children, continue_from, self.structured_output)
        except ValueError:
            self.output_processor.abort(request_id)
            raise
        if continue_from is None:
            self.scheduler.add_request_group(children)
        for child in children if continue_from is not None else ():
            self.scheduler.add_request(child)  # each has its own tokens: no prompt forks

    def abort_request(self, request_id: str) -> None:
        """Stop a user request (all its samples) and free its KV blocks now."""
        child_ids = self.output_processor.child_ids(request_id)
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block of the pool (not of the tiers below it). False, and
        nothing changed, while a request holds blocks."""
        return self.kv_cache_manager.reset_prefix_cache()

    def flush_kv_saves(self, timeout: float | None = None) -> bool:
        """Wait until the blocks saved so far are written to every tier (tests, benchmarks:
        the slow tiers are written in the background). False when `timeout` passed first."""
        return self.kv_connector is None or self.kv_connector.flush(timeout)

    def close(self) -> None:
        """Finish the KV saves ordered so far and release the connector (its writer thread,
        files, connections); the engine is not stepped afterwards."""
        if self.kv_connector is not None:
            self.kv_connector.close()

    def take_kv_events(self) -> list[KVEvent]:
        """Blocks stored in and removed from the prefix cache since the last call, oldest
        first ([] unless built with `enable_kv_events`)."""
        return self.kv_cache_manager.take_events()

    def get_load(self) -> EngineLoad:
        """Tokens queued for prefill and running decodes, for SLO admission (engine/slo.py)."""
        return self.scheduler.get_load()

    def get_metrics(self) -> EngineMetrics:
        """Gauges and cumulative counters of the scheduler, the KV cache and its tiers."""
        stats = self.scheduler.get_stats()
        manager = self.kv_cache_manager
        prefix = manager.prefix_cache_stats
        tiers = ConnectorMetrics({}, 0, {}, {})
        if self.kv_connector is not None:
            tiers = self.kv_connector.get_metrics()
        return EngineMetrics(
            num_requests_running=stats.num_running,
            num_requests_waiting=stats.num_waiting,
            kv_cache_usage=stats.kv_cache_usage,
            num_kv_blocks=manager.num_usable_blocks,
            num_kv_blocks_used=manager.num_used_blocks,
            num_kv_blocks_cached=manager.pool.num_cached_blocks,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            prefix_cache_evictions=prefix.evictions,
            num_preemptions=stats.num_preemptions,
            prompt_tokens=stats.num_prompt_tokens,
            computed_prompt_tokens=stats.num_computed_prompt_tokens,
            generation_tokens=stats.num_generation_tokens,
            kv_tiers=tiers.tiers,
            kv_tier_unreadable=tiers.num_unreadable,
            kv_restore_runs=tiers.restore_runs,
            kv_restore_blocks=tiers.restore_blocks,
            num_swapped_out_blocks=stats.num_swapped_out_blocks,
            num_swapped_in_blocks=stats.num_swapped_in_blocks,
            num_preempted_recomputed_tokens=stats.num_preempted_recomputed_tokens,
        )

    def tokenize(self, prompt: PromptInput | TokenizedPrompt) -> TokenizedPrompt:
        """Text, token ids and cache salt of a prompt (see `engine/prompts.py`); ValueError
        naming the field for a malformed one. Token ids are checked by `validate`."""
        return tokenize_prompt(self.tokenizer, prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Check a request against the model and the engine limits; resolve max_tokens
        (engine/validation.py). A structured-output constraint is compiled here, so a bad
        schema, regex or grammar is a ValueError before any work."""
        if params.structured_output is not None:
            self.structured_output.check(params.structured_output)
        return validate_request(
            prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len
        )

    def _eos_token_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)


def _resolve_model_path(model: str | None) -> str:
    if model is not None:
        return str(model)
    from kvserve.default_model import resolve_default_model

    return resolve_default_model()
