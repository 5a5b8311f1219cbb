"""Continuous batching with chunked prefill under one token budget per step.

There is no prefill or decode phase: every step, each request gets up to
`num_tokens - num_computed_tokens` new tokens, within `max_num_batched_tokens` for the whole
step and `max_num_seqs` running requests. Running requests go first (in admission order), then
waiting ones (see `_admit_waiting` for the rule when one does not fit). When the KV pool cannot
hold a running request's next tokens, the newest running request is preempted: the
preemption strategy releases its blocks (engine/preemption.py) and it waits at the head of
the queue, to resume later with identical output.

The scheduler reads as schedule -> update -> finish; the queues it schedules from and their
moves are `RequestQueues` (engine/request_queues.py), whose forks of `n > 1` and beam search,
and beam holds, are kept by `Forks` (engine/forks.py).
"""

from __future__ import annotations

import time

from kvserve.engine.request_queues import RequestQueues
from kvserve.engine.scheduler_config import SchedulerConfig as SchedulerConfig  # re-exported
from kvserve.engine.scheduler_config import SchedulerStats
from kvserve.engine.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from kvserve.engine.slo import EngineLoad
from kvserve.engine.structured_output import StructuredOutputManager
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.request import Request, RequestStatus


class Scheduler(RequestQueues):
    """Decides which tokens of which requests run each step, and applies what the step sampled.

    The request state it schedules from, and its moves (add, fork, hold, preempt), are those
    of `RequestQueues`; this class adds the policy and the end of a request's life.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        structured_output: StructuredOutputManager | None = None,
    ) -> None:
        super().__init__(
            kv_cache_manager,
            config.max_num_seqs,
            config.preemption_mode,
            config.max_bypass_steps,
        )
        self.config = config
        # Grammar matchers of requests with structured output (created by the engine).
        self.structured_output = structured_output or StructuredOutputManager()
        self.num_prompt_tokens = 0
        self.num_computed_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._finished_ids: list[str] = []

    # ---- requests out --------------------------------------------------------------------

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """End requests from outside a step (abort, stop string): free their blocks now."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            self._finish(request, status)

    def get_stats(self) -> SchedulerStats:
        preemption = self.preemption.stats
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            kv_cache_usage=self.kv_cache_manager.usage,
            num_prompt_tokens=self.num_prompt_tokens,
            num_computed_prompt_tokens=self.num_computed_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_swapped_out_blocks=preemption.num_swapped_out_blocks,
            num_swapped_in_blocks=preemption.num_swapped_in_blocks,
            num_preempted_recomputed_tokens=preemption.num_recomputed_tokens,
        )

    def get_load(self) -> EngineLoad:
        """What a request arriving now would queue behind (engine/slo.py): the tokens to
        compute before waiting requests and running ones still prefilling (a prompt, or a
        recompute after preemption) sample again, and the running decodes. Prefix hits of
        waiting requests are not looked up: the count is an upper bound."""
        queued = sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        decoding = 0
        for request in self.running:
            remaining = request.num_tokens - request.num_computed_tokens
            if request.output_token_ids and remaining <= 1:  # only its last sampled token
                decoding += 1
            else:
                queued += remaining
        return EngineLoad(queued, decoding)

    # ---- one step ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens and reserve their KV slots.

        Advances each scheduled request's `num_computed_tokens` as if the step succeeds (the
        model runner never fails a step without the engine failing).
        """
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        budget, preempted = self._schedule_running(scheduled, budget)
        if not preempted:
            self._admit_waiting(scheduled, budget)
        scheduled.sort(key=lambda r: r.num_new_tokens != 1)  # decodes first, order kept
        manager = self.kv_cache_manager
        output = SchedulerOutput(
            scheduled=scheduled,
            blocks_to_swap_out=self.preemption.take_blocks_to_swap_out(),
            blocks_to_load=manager.take_blocks_to_load(),
            block_copies=manager.take_block_copies(),
            blocks_to_save=manager.take_blocks_to_save(),
            finished_request_ids=self._finished_ids,
            grammar_bitmask=self.structured_output.grammar_bitmask(scheduled),
        )
        self._finished_ids = []
        return output

    def _schedule_running(self, scheduled: list[ScheduledRequest], budget: int) -> tuple[int, bool]:
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if self.forks.is_held(request):
                index += 1
                continue
            if self.forks.at_fork_point(request):
                self._fork_pending(request, index + 1)
            num_new = self._num_new_tokens(request, request.num_computed_tokens, budget)
            if num_new == 0:
                index += 1
                continue
            while self.kv_cache_manager.allocate_slots(request, num_new) is None:
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    break
            else:
                scheduled.append(self._schedule_request(request, num_new))
                budget -= num_new
                index += 1
        return budget, preempted

    def _admit_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        """Admit waiting requests in queue order while the budget and `max_num_seqs` allow.

        One that does not fit may be passed by the ones behind it, within the bound of
        `RequestQueue` (engine/request_queue.py). Held requests are skipped.
        """
        for request in self.waiting.start_admission():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if self.forks.is_held(request):
                continue
            num_new = self._admit(request, budget)
            if num_new is None:
                if not self.waiting.skip(request):
                    break
            elif num_new > 0:  # 0: admitted at its fork point, the group forks next step
                scheduled.append(self._schedule_request(request, num_new))
                budget -= num_new
        self.waiting.end_admission()

    def _admit(self, request: Request, budget: int) -> int | None:
        """Move a waiting request to `running` with its prefix hit and this step's slots.

        Returns its number of new tokens this step, or None (and nothing changed) if it
        does not fit.
        """
        group_size = self.forks.group_size(request)
        if len(self.running) + group_size > self.config.max_num_seqs:
            return None
        hit_blocks, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
        num_new = self._num_new_tokens(request, num_hit_tokens, budget)
        at_fork_point = num_hit_tokens == self.forks.fork_point(request)
        if num_new == 0 and not at_fork_point:
            return None
        if self.kv_cache_manager.allocate_slots(request, num_new, hit_blocks) is None:
            return None
        self.waiting.admit(request)
        self.preemption.resume(request, num_hit_tokens, len(hit_blocks.external_hashes))
        request.num_computed_tokens = num_hit_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit_tokens
            by_tier = hit_blocks.num_tokens_by_tier(self.kv_cache_manager.block_size)
            request.num_cached_tokens_by_tier = by_tier
            self.num_prompt_tokens += request.num_prompt_tokens
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return num_new

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        """Tokens to compute this step: all that remain, cut to the budget when chunking.

        Without chunked prefill (and always when the cache keeps nothing, cache_mode "none")
        a request runs whole or not at all this step. A parent whose samples have not forked
        yet stops at the fork point.
        """
        fork_point = self.forks.fork_point(request)
        end = request.num_tokens if fork_point is None else fork_point
        num_new = end - num_computed
        if num_new <= budget:
            return num_new
        if self.config.enable_chunked_prefill and self.kv_cache_manager.caches_kv:
            return budget
        return 0

    def _schedule_request(self, request: Request, num_new: int) -> ScheduledRequest:
        """Name the request's next `num_new` tokens for this step and count them computed."""
        start = request.num_computed_tokens
        entry = ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + num_new],
            num_computed_tokens=start,
            block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
            sample=start + num_new == request.num_tokens,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            eos_token_ids=request.eos_token_ids,
            prompt_logprob_positions=request.take_prompt_logprob_positions(start, num_new),
        )
        request.num_computed_tokens += num_new
        self.num_computed_prompt_tokens += max(0, min(num_new, request.num_prompt_tokens - start))
        return entry

    # ---- after the model ran ---------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_output: ModelRunnerOutput
    ) -> list[Request]:
        """Append sampled tokens, apply stop conditions, free finished requests.

        A request with structured output stops when its grammar is complete and is aborted
        when its grammar matcher fails (see `StructuredOutputManager.accept_token`).

        Returns the requests that received a token this step (finished ones included).
        """
        now = time.monotonic()
        updated: list[Request] = []
        self.kv_cache_manager.commit_step()  # the step's full blocks are written: cache them
        if not self.kv_cache_manager.caches_kv:  # nothing was kept: next step starts over
            for entry in scheduler_output.scheduled:
                self.requests[entry.request_id].num_computed_tokens = 0
        for request_id, token_id in zip(
            model_output.request_ids, model_output.sampled_token_ids, strict=True
        ):
            request = self.requests[request_id]
            request.append_output_token(token_id)
            self.num_generation_tokens += 1
            if request.first_token_time is None:
                request.first_token_time = now
            status = self.structured_output.accept_token(request_id, token_id)
            if status is None:
                status = self._check_stop(request, token_id)
            if status is not None:
                self._finish(request, status)
            updated.append(request)
        return updated

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in request.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self._remove(request, status)
        self.structured_output.free(request.request_id)
        self._finished_ids.append(request.request_id)

    def check_invariants(self) -> None:
        """Request lists agree with each other and with the KV cache manager."""
        super().check_invariants()
        self.preemption.check_invariants({r.request_id for r in self.waiting})
        self.structured_output.check_invariants(set(self.requests))
        self.kv_cache_manager.check_invariants()
