"""Prompt logprobs, the runner's half: log_softmax over the logits of prompt positions.

The scheduler names the positions (`ScheduledRequest.prompt_logprob_positions`, each once in
a request's life); this module scores them from the step's hidden states. Position p of a
request scores its prompt token p + 1, so a prompt of P tokens has P - 1 scored positions,
which chunks of a chunked prefill deliver in order:

    flat batch:  [ d0 | d1 | c c c c c | e e ]      query_start_loc 0 1 2 7 9
    request c:   num_computed_tokens 8, positions 9..11 due  ->  batch rows 2+1 .. 2+3

The LM head runs on those rows only, `MAX_ROWS_PER_SLICE` at a time, so a long chunk never
holds all its (chunk_len, vocab) float32 logits at once. Values are the sampler's
(`gather_logprobs`: log_softmax of the raw logits, rank = how many tokens are at least as
likely, top-k best first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvserve.engine.sampler import gather_logprobs
from kvserve.engine.scheduler_output import PromptLogprobRows, ScheduledRequest, TokenLogprobs
from kvserve.model.layers import CausalLM

# (128, vocab 49152) float32 logits = 24 MiB at a time, plus log_softmax's copy.
MAX_ROWS_PER_SLICE = 128


def compute_prompt_logprobs(
    model: CausalLM,
    hidden: torch.Tensor,
    scheduled: Sequence[ScheduledRequest],
    query_start_loc: Sequence[int],
) -> dict[str, PromptLogprobRows]:
    """Score every scheduled request's `prompt_logprob_positions`.

    Args:
        model: computes logits from hidden states (`compute_logits`).
        hidden: (num_tokens, hidden) states of the step's flat batch.
        scheduled: the step's requests, in batch order.
        query_start_loc: where each request's rows start in the batch (len(scheduled) + 1).
    Returns:
        request id -> its rows, for the requests with positions due (no entry otherwise).
    """
    rows: list[int] = []
    targets: list[int] = []
    ks: list[int] = []
    owners: list[tuple[str, int, int]] = []  # (request id, first position, number of rows)
    for entry, offset in zip(scheduled, query_start_loc, strict=False):
        positions = entry.prompt_logprob_positions
        if not positions:
            continue
        rows.extend(offset + p - entry.num_computed_tokens for p in positions)
        targets.extend(entry.prompt_token_ids[p + 1] for p in positions)
        ks.extend([entry.sampling_params.prompt_logprobs or 0] * len(positions))
        owners.append((entry.request_id, positions.start, len(positions)))
    if not rows:
        return {}
    index = torch.tensor(rows, dtype=torch.long, device=hidden.device)  # (num_rows,)
    selected = hidden[index]  # (num_rows, hidden)
    scored: list[TokenLogprobs] = []
    for begin in range(0, len(rows), MAX_ROWS_PER_SLICE):
        end = begin + MAX_ROWS_PER_SLICE
        logits = model.compute_logits(selected[begin:end])  # (slice, vocab) float32
        scored += gather_logprobs(logits, ks[begin:end], targets[begin:end])
    result: dict[str, PromptLogprobRows] = {}
    cursor = 0
    for request_id, start, count in owners:
        result[request_id] = PromptLogprobRows(start, scored[cursor : cursor + count])
        cursor += count
    return result
