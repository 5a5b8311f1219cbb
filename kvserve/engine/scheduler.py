"""Continuous batching with chunked prefill under one token budget per step.

There is no prefill or decode phase: every step, each request gets up to
`num_tokens - num_computed_tokens` new tokens, within `max_num_batched_tokens` for the whole
step and `max_num_seqs` running requests. Running requests go first (in admission order), then
waiting ones. When the KV pool cannot hold a running request's next tokens, the newest running
request is preempted by recompute: its blocks are freed and it waits at the head of the queue,
to resume later with identical output (its generated tokens are kept and re-prefilled).

Forks share KV blocks instead of recomputing them (paged mode):

- `add_request_group` queues the samples of an `n > 1` request: the first (the parent)
  prefills all but the last prompt token, then the others fork from it and every sample
  computes the last prompt token itself, writing into its own copy of the partial last block:

      prompt      [ p0 ......................... pP-2 | pP-1 ]
      parent      prefill (chunked as usual)            fork point F = P - 1
      samples     share blocks of [0, F) ------------>  each computes pP-1 and samples

- `fork_request` copies a running request whose newest token is not computed yet (beam
  search): the copy shares every block and may replace that newest token.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from kvserve.engine.forks import PendingForks
from kvserve.engine.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from kvserve.engine.structured_output import StructuredOutputManager
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
    """Request counts now, and cumulative token counters (see `kvserve.metrics`)."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_cache_usage: float
    num_prompt_tokens: int  # prompt tokens of every admitted request, counted once
    num_computed_prompt_tokens: int  # prompt positions computed (misses, recomputes)
    num_generation_tokens: int  # tokens sampled


class Scheduler:
    """Decides which tokens of which requests run each step, and owns request state."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        structured_output: StructuredOutputManager | None = None,
    ) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        # Grammar matchers of requests with structured output (created by the engine).
        self.structured_output = structured_output or StructuredOutputManager()
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_computed_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._finished_ids: list[str] = []
        self._pending_forks = PendingForks()
        # Requests not to schedule for now (beam search holds a beam until its group moves
        # on); they keep their blocks and may still be preempted.
        self.held: set[str] = set()

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a validated request (the engine checks lengths and ids before this)."""
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_request_group(self, requests: list[Request]) -> None:
        """Queue the samples of one `n > 1` request so that they share the prompt's blocks.

        Sharing needs the paged cache and room for the whole group among `max_num_seqs`;
        otherwise the samples run as independent requests (prefix caching still shares
        their full prompt blocks).
        """
        parent, children = requests[0], requests[1:]
        sharing = self.kv_cache_manager.cache_mode == "paged"
        if not children or not sharing or len(requests) > self.config.max_num_seqs:
            for request in requests:
                self.add_request(request)
            return
        self.add_request(parent)
        for child in children:
            self.requests[child.request_id] = child
        self._pending_forks.add(parent, children)

    def fork_request(self, parent_id: str, child_id: str, last_token_id: int) -> Request:
        """A copy of a request that shares all its blocks (beam search).

        The parent's newest token must not be computed yet (it was just sampled); the copy
        takes `last_token_id` in its place. No block is copied now: the first write into a
        shared block copies it (see `KVCacheManager.fork`). A preempted parent has no blocks:
        its copy waits right behind it and recomputes too.

        Raises:
            ValueError: the parent is unknown or finished, the child id exists, or the
                parent's newest token is already computed.
        """
        parent = self.requests.get(parent_id)
        if parent is None or parent.is_finished:
            raise ValueError(f"request_id: cannot fork {parent_id!r}, it is not in the scheduler")
        if child_id in self.requests:
            raise ValueError(f"request_id: {child_id!r} already exists")
        child = parent.copy(child_id)
        child.replace_last_token(last_token_id)
        if parent.status == RequestStatus.RUNNING:
            self._fork(parent, child)
            self.running.append(child)
        else:  # preempted: nothing to share, the copy recomputes like its parent
            child.status = parent.status
            self.requests[child_id] = child
            self.waiting.insert(self.waiting.index(parent) + 1, child)
        return child

    def preempt_held(self) -> int:
        """Preempt every held running request (newest first) to free its blocks.

        For a driver whose held requests starve the others of KV blocks. Returns how many
        were preempted.
        """
        victims = [r for r in reversed(self.running) if r.request_id in self.held]
        for request in victims:
            self._preempt(request)
        return len(victims)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """End requests from outside a step (abort, stop string): free their blocks now."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif not self._pending_forks.remove(request):
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
            num_prompt_tokens=self.num_prompt_tokens,
            num_computed_prompt_tokens=self.num_computed_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
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
            grammar_bitmask=self.structured_output.grammar_bitmask(scheduled),
        )
        self._finished_ids = []
        return output

    def _schedule_running(self, scheduled: list[ScheduledRequest], budget: int) -> tuple[int, bool]:
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.request_id in self.held:
                index += 1
                continue
            if self._pending_forks.at_fork_point(request):
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
                scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                index += 1
        return budget, preempted

    def _schedule_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        for request in list(self.waiting):
            if budget <= 0:
                break
            if request.request_id in self.held:
                continue
            group_size = self._pending_forks.group_size(request)
            if len(self.running) + group_size > self.config.max_num_seqs:
                break
            hit_blocks, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, num_hit_tokens, budget)
            at_fork_point = num_hit_tokens == self._pending_forks.fork_point(request)
            if num_new == 0 and not at_fork_point:
                break
            if self.kv_cache_manager.allocate_slots(request, num_new, hit_blocks) is None:
                break
            self.waiting.remove(request)
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
                self.num_prompt_tokens += request.num_prompt_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if num_new == 0:  # admitted at its fork point: the group forks next step
                continue
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        """Tokens to compute this step: all that remain, cut to the budget when chunking.

        Without chunked prefill (and always when the cache keeps nothing, cache_mode "none")
        a request runs whole or not at all this step. A parent whose samples have not forked
        yet stops at the fork point.
        """
        fork_point = self._pending_forks.fork_point(request)
        end = request.num_tokens if fork_point is None else fork_point
        num_new = end - num_computed
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
            prompt_logprob_positions=request.take_prompt_logprob_positions(start, num_new),
        )
        request.num_computed_tokens += num_new
        self.num_computed_prompt_tokens += max(0, min(num_new, request.num_prompt_tokens - start))
        return entry

    # ---- forks ---------------------------------------------------------------------------

    def _fork_pending(self, parent: Request, position: int) -> None:
        """Fork the parent's waiting samples into `running` right after the parent.

        They are scheduled in this same step: the blocks they share hold tokens computed in
        earlier steps only, so copy-on-write copies finished K/V.
        """
        children = self._pending_forks.take(parent.request_id)
        for child in children:
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.num_prompt_logprobs_scheduled = parent.num_prompt_logprobs_scheduled
            child.first_scheduled_time = parent.first_scheduled_time
            self._fork(parent, child)
        self.running[position:position] = children

    def _fork(self, parent: Request, child: Request) -> None:
        self.kv_cache_manager.fork(parent, child)
        child.status = RequestStatus.RUNNING
        self.requests[child.request_id] = child

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

        A request with structured output stops when its grammar is complete and is aborted
        when its grammar matcher fails (see `StructuredOutputManager.accept_token`).

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
            self.num_generation_tokens += 1
            if request.first_token_time is None:
                request.first_token_time = now
            status = self.structured_output.accept_token(request_id, token_id)
            if status is None:
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
        self.held.discard(request.request_id)
        # A parent that ends before its samples forked leaves them to run on their own.
        for child in reversed(self._pending_forks.take(request.request_id)):
            self.waiting.appendleft(child)
        request.status = status
        self.kv_cache_manager.free(request)
        self.structured_output.free(request.request_id)
        self._finished_ids.append(request.request_id)
        del self.requests[request.request_id]

    def check_invariants(self) -> None:
        """Request lists agree with each other and with the KV cache manager."""
        running_ids = {r.request_id for r in self.running}
        waiting_ids = {r.request_id for r in self.waiting}
        pending_ids = self._pending_forks.child_ids()
        if running_ids & waiting_ids:
            raise AssertionError(f"requests both running and waiting: {running_ids & waiting_ids}")
        if pending_ids & (running_ids | waiting_ids):
            raise AssertionError(f"forks both pending and queued: {pending_ids}")
        if not self._pending_forks.parent_ids() <= running_ids | waiting_ids:
            raise AssertionError("a pending fork's parent is neither running nor waiting")
        if running_ids | waiting_ids | pending_ids != set(self.requests):
            raise AssertionError("scheduler request map disagrees with its queues")
        if len(self.running) > self.config.max_num_seqs:
            raise AssertionError("more running requests than max_num_seqs")
        for request in self.running:
            if request.status != RequestStatus.RUNNING:
                raise AssertionError(f"{request} in running list")
        self.structured_output.check_invariants(set(self.requests))
        self.kv_cache_manager.check_invariants()
