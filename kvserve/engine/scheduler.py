"""Continuous batching with chunked prefill under one token budget per step.

There is no prefill or decode phase: every step, each request gets up to
`num_tokens - num_computed_tokens` new tokens, within `max_num_batched_tokens` for the whole
step and `max_num_seqs` running requests. Running requests go first (in admission order), then
waiting ones. When the KV pool cannot hold a running request's next tokens, the newest running
request is preempted by recompute: its blocks are freed and it waits at the head of the queue,
to resume later with identical output (its generated tokens are kept and re-prefilled).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from kvserve.engine.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """The resolved limits the scheduler enforces (see `kvserve.config.EngineConfig`)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True


class SchedulerStats(NamedTuple):
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_cache_usage: float


class Scheduler:
    """Decides which tokens of which requests run each step, and owns request state."""

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_ids: list[str] = []

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a validated request (the engine checks lengths and ids before this)."""
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """End requests from outside a step (abort, stop string): free their blocks now."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            kv_cache_usage=self.kv_cache_manager.usage,
        )

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
            self._schedule_waiting(scheduled, budget)
        scheduled.sort(key=lambda r: r.num_new_tokens != 1)  # decodes first, order kept
        output = SchedulerOutput(
            scheduled=scheduled,
            block_copies=self.kv_cache_manager.take_block_copies(),
            finished_request_ids=self._finished_ids,
        )
        self._finished_ids = []
        return output

    def _schedule_running(self, scheduled: list[ScheduledRequest], budget: int) -> tuple[int, bool]:
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
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
                scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                index += 1
        return budget, preempted

    def _schedule_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hit_blocks, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, num_hit_tokens, budget)
            if num_new == 0:
                break
            if self.kv_cache_manager.allocate_slots(request, num_new, hit_blocks) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        """Tokens to compute this step: all that remain, cut to the budget when chunking.

        Without chunked prefill (and always when the cache keeps nothing, cache_mode "none")
        a request runs whole or not at all this step.
        """
        num_new = request.num_tokens - num_computed
        if num_new <= budget:
            return num_new
        if self.config.enable_chunked_prefill and self.kv_cache_manager.caches_kv:
            return budget
        return 0

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
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
        )
        request.num_computed_tokens += num_new
        return entry

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- after the model ran ---------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_output: ModelRunnerOutput
    ) -> list[Request]:
        """Append sampled tokens, apply stop conditions, free finished requests.

        Returns the requests that received a token this step (finished ones included).
        """
        now = time.monotonic()
        updated: list[Request] = []
        if not self.kv_cache_manager.caches_kv:  # nothing was kept: next step starts over
            for entry in scheduler_output.scheduled:
                self.requests[entry.request_id].num_computed_tokens = 0
        for request_id, token_id in zip(
            model_output.request_ids, model_output.sampled_token_ids, strict=True
        ):
            request = self.requests[request_id]
            request.append_output_token(token_id)
            if request.first_token_time is None:
                request.first_token_time = now
            status = self._check_stop(request, token_id)
            if status is not None:
                self.running.remove(request)
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
        request.status = status
        self.kv_cache_manager.free(request)
        self._finished_ids.append(request.request_id)
        del self.requests[request.request_id]

    def check_invariants(self) -> None:
        """Request lists agree with each other and with the KV cache manager."""
        running_ids = {r.request_id for r in self.running}
        waiting_ids = {r.request_id for r in self.waiting}
        if running_ids & waiting_ids:
            raise AssertionError(f"requests both running and waiting: {running_ids & waiting_ids}")
        if running_ids | waiting_ids != set(self.requests):
            raise AssertionError("scheduler request map disagrees with its queues")
        if len(self.running) > self.config.max_num_seqs:
            raise AssertionError("more running requests than max_num_seqs")
        for request in self.running:
            if request.status != RequestStatus.RUNNING:
                raise AssertionError(f"{request} in running list")
        self.kv_cache_manager.check_invariants()
