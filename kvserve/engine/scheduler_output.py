"""The only things the scheduler and the model runner say to each other.

The scheduler fills a `SchedulerOutput` with plain Python (ids, counts, block tables); the
model runner turns it into tensors, runs the model and answers with a `ModelRunnerOutput`.
Neither side reaches into the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step.

    The step computes K/V for `token_ids`, which sit at positions
    [num_computed_tokens, num_computed_tokens + len(token_ids)) of the request:

        all tokens:  [ t0 t1 ... | tc ... tc+k-1 | ... ]
                     0    num_computed_tokens    +k = seq_len after the step

    `sample` is True when the last of those tokens is the request's last known token, so
    its logits give the next token (a decode step, or the last chunk of a prefill).

    `prompt_logprob_positions` are the positions of this chunk whose logits score the next
    prompt token (`prompt_logprobs`): position p gives the logprobs of prompt token p + 1,
    so they lie within [num_computed_tokens, seq_len) and below num_prompt_tokens - 1. Each
    position is named in exactly one step of a request's life (never again after a
    preemption or in cache_mode "none"); empty when the request did not ask.
    """

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]
    prompt_logprob_positions: range = range(0)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + len(self.token_ids)


@dataclass
class GrammarBitmask:
    """Which next tokens the grammars of this step's constrained sampled requests allow.

    Row i of `bitmask` belongs to `request_ids[i]`; bit b (least significant first) of word w
    allows token 32 * w + b (llguidance's layout). Columns past the model's vocabulary are 0.
    A NumPy array, not a tensor: the model runner turns it into one.
    """

    request_ids: list[str]
    bitmask: npt.NDArray[np.int32]  # (len(request_ids), ceil(vocab_size / 32))


@dataclass
class SchedulerOutput:
    """Everything the model runner needs for one step.

    `scheduled` lists decode requests (one new token each) before prefill chunks, so the runner
    can batch the decodes. `grammar_bitmask` masks the rows of sampled requests with
    structured output (None when there are none).

    KV moves, in the order the runner carries them out:

        blocks_to_swap_out -> blocks_to_load -> block_copies -> forward -> blocks_to_save

    `blocks_to_swap_out` are (block_id, block_hash) of a preempted request's full blocks,
    freed while scheduling this step, for the connector to keep before anything overwrites
    them (swap preemption); `blocks_to_load` are (block_id, block_hash) of fresh blocks to
    fill from the connector (a prefix hit beyond the pool); `block_copies` are (src, dst)
    block ids (copy-on-write of a shared block); `blocks_to_save` are (block_id, block_hash)
    of full blocks this forward writes, for the connector to keep (empty unless it saves).
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    blocks_to_swap_out: list[BlockTransfer] = field(default_factory=list)
    blocks_to_load: list[BlockTransfer] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_save: list[BlockTransfer] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    grammar_bitmask: GrammarBitmask | None = None

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class TokenLogprobs(NamedTuple):
    """Log-probabilities of the raw model output at one position.

    `logprob` and `rank` (1 = most likely) are the sampled token's; `top_token_ids` and
    `top_logprobs` are the k most likely tokens, best first.
    """

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


class PromptLogprobRows(NamedTuple):
    """Prompt logprobs of one request's chunk: `rows[i]` scores prompt token
    `start + i + 1` (its `token_id`) from the logits at position `start + i`."""

    start: int
    rows: list[TokenLogprobs]


@dataclass
class ModelRunnerOutput:
    """One new token for every scheduled request whose `sample` was True, in schedule order,
    and the prompt logprobs of every request with `prompt_logprob_positions` (by request id;
    such a request need not sample this step)."""

    request_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs: dict[str, PromptLogprobRows] = field(default_factory=dict)
