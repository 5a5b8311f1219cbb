"""A request's state as the scheduler and the KV cache manager see it (pure Python)."""

from __future__ import annotations

import enum
import time

from kvserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything above PREEMPTED is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence being generated.

    Progress is "num_computed_tokens catches up with num_tokens": tokens whose K/V are in the
    cache count as computed. A prefix-cache hit starts num_computed_tokens above 0, a chunked
    prefill advances it in pieces, preemption by recompute resets it to 0.

        all_token_ids: [ prompt ............ | output ...... ]
                       0             num_computed_tokens    num_tokens
                       |---- K/V cached ----|-- to compute --|
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.cache_salt = cache_salt
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Prompt tokens found in the prefix cache at first scheduling (reported to the user).
        self.num_cached_tokens = -1
        # ... and where they came from: "pool" and tier names -> tokens (only nonzero ones).
        self.num_cached_tokens_by_tier: dict[str, int] = {}
        self.num_preemptions = 0
        # Prompt-logprob positions [0, n) already scheduled once (see prompt_logprob_positions).
        self.num_prompt_logprobs_scheduled = 0
        # Hashes of the full blocks of all_token_ids (kv/block_hash.py), extended by the KV
        # cache manager whether prefix caching is on or off: a router computes the same ones.
        self.block_hashes: list[bytes] = []
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.stop_reason: int | str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def max_tokens(self) -> int:
        assert self.sampling_params.max_tokens is not None, "resolved by the engine on add"
        return self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def max_prefix_hit_tokens(self) -> int:
        """How many leading tokens a prefix-cache hit may cover.

        The last token is always recomputed (its logits are needed). A request that asks for
        `prompt_logprobs` must compute the logits of every prompt position once, so a hit
        may only cover positions already scored: none at first (as in vLLM, such a request
        takes no prefix hit), all of them when it resumes after a preemption.
        """
        limit = max(0, self.num_tokens - 1)
        if self.sampling_params.prompt_logprobs is None:
            return limit
        return min(limit, self.num_prompt_logprobs_scheduled)

    def take_prompt_logprob_positions(self, start: int, num_new: int) -> range:
        """The positions of a chunk [start, start + num_new) whose logits score a prompt
        token for the first time; records them as scheduled.

            positions   0 ..... done-1 | done ...... P-2 | P-1 (scores the first output)
                        scored earlier | due now, within the chunk

        Returns an empty range for a request without `prompt_logprobs`.
        """
        if self.sampling_params.prompt_logprobs is None:
            return range(0)
        first = max(start, self.num_prompt_logprobs_scheduled)
        end = min(start + num_new, self.num_prompt_tokens - 1)
        if end <= first:
            return range(0)
        self.num_prompt_logprobs_scheduled = end
        return range(first, end)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def copy(self, request_id: str) -> Request:
        """A copy under a new id, with the same tokens and progress (a fork; see Scheduler).

        The copy is WAITING until the scheduler places it; timing fields are kept.
        """
        child = Request(
            request_id,
            self.prompt_token_ids,
            self.sampling_params,
            eos_token_ids=self.eos_token_ids,
            arrival_time=self.arrival_time,
            cache_salt=self.cache_salt,
        )
        child.output_token_ids = list(self.output_token_ids)
        child.all_token_ids = list(self.all_token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.num_cached_tokens_by_tier = dict(self.num_cached_tokens_by_tier)
        child.num_prompt_logprobs_scheduled = self.num_prompt_logprobs_scheduled
        child.block_hashes = list(self.block_hashes)
        child.first_scheduled_time = self.first_scheduled_time
        child.first_token_time = self.first_token_time
        return child

    def replace_last_token(self, token_id: int) -> None:
        """Swap the newest output token for another one before its K/V is computed.

        Block hashes never cover it yet: the KV cache manager hashes a block when a step
        allocates it, and this token was appended after the last step's allocation.

        Raises:
            ValueError: there is no output token, or the newest one is already computed.
        """
        if not self.output_token_ids or self.num_computed_tokens >= self.num_tokens:
            raise ValueError(f"{self}: no uncomputed output token to replace")
        self.output_token_ids[-1] = token_id
        self.all_token_ids[-1] = token_id

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens})"
        )
