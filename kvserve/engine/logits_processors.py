"""Logits processors: edit a step's logits in place, before the sampler chooses a token.

The sampler runs them in this order on a float32 copy of the logits (row i of `logits`
belongs to `requests[i]`), after it has kept the raw logits for logprobs:

    1. apply_penalties      repetition (prompt + output), presence and frequency (output only)
    2. apply_logit_bias     added per token id (OpenAI's order: after the penalties)
    3. apply_min_tokens     stop and EOS ids masked to -inf until enough tokens are out
    4. apply_token_bitmask  tokens the request's grammar forbids masked to -inf

Each one leaves the rows of requests that do not use it untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvserve.engine.scheduler_output import GrammarBitmask, ScheduledRequest


def apply_penalties(logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
    """Apply repetition, presence and frequency penalties in place (vLLM / OpenAI forms).

    Repetition (HF form) covers prompt and output tokens: positive logits are divided by the
    penalty, negative ones multiplied. Presence subtracts a constant from every token already
    in the output; frequency subtracts per occurrence in the output.
    """
    rows = [i for i, r in enumerate(requests) if r.sampling_params.needs_penalties]
    if not rows:
        return
    params = [requests[i].sampling_params for i in rows]
    vocab_size = logits.shape[-1]
    device = logits.device
    output_counts = _token_counts([requests[i].output_token_ids for i in rows], vocab_size, device)
    prompt_counts = _token_counts([requests[i].prompt_token_ids for i in rows], vocab_size, device)
    seen = (output_counts > 0) | (prompt_counts > 0)  # (n, vocab)
    rep = torch.tensor([p.repetition_penalty for p in params], device=device)  # (n,)
    rep = torch.where(seen, rep.unsqueeze(1), 1.0)  # (n, vocab)
    x = logits[rows]  # (n, vocab)
    x = torch.where(x > 0, x / rep, x * rep)  # (n, vocab)
    freq = torch.tensor([p.frequency_penalty for p in params], device=device)  # (n,)
    presence = torch.tensor([p.presence_penalty for p in params], device=device)  # (n,)
    x -= freq.unsqueeze(1) * output_counts  # (n, vocab)
    x -= presence.unsqueeze(1) * (output_counts > 0)  # (n, vocab)
    logits[rows] = x


def _token_counts(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """(len(token_lists), vocab_size) float counts of each token id per list."""
    width = max((len(t) for t in token_lists), default=0)
    padded = [list(t) + [vocab_size] * (width - len(t)) for t in token_lists]
    ids = torch.tensor(padded, dtype=torch.long, device=device).view(len(padded), width)  # (n, w)
    counts = torch.zeros(len(padded), vocab_size + 1, device=device)  # (n, vocab + 1)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab_size]  # (n, vocab); the extra column counted the padding


def apply_logit_bias(logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
    """Add each request's `logit_bias` (token id -> bias) to its row, in place.

    The engine has checked that every biased id is inside the vocabulary.
    """
    rows: list[int] = []
    cols: list[int] = []
    biases: list[float] = []
    for i, request in enumerate(requests):
        bias = request.sampling_params.logit_bias or {}
        rows += [i] * len(bias)
        cols += bias.keys()
        biases += bias.values()
    if rows:
        # (row, col) pairs are unique (dict keys per row), so += adds each bias once
        logits[rows, cols] += torch.tensor(biases, device=logits.device)  # (num_biased,)


def apply_min_tokens(logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
    """Mask stop token ids (and EOS, unless `ignore_eos`) to -inf before `min_tokens` outputs.

    With `ignore_eos` EOS does not stop the request, so there is nothing to hold back.
    """
    vocab_size = logits.shape[-1]
    rows: list[int] = []
    cols: list[int] = []
    for i, request in enumerate(requests):
        params = request.sampling_params
        if len(request.output_token_ids) >= params.min_tokens:
            continue
        banned = set(params.stop_token_ids)
        if not params.ignore_eos:
            banned |= request.eos_token_ids
        ids = sorted(t for t in banned if t < vocab_size)
        rows += [i] * len(ids)
        cols += ids
    if rows:
        logits[rows, cols] = float("-inf")


def apply_token_bitmask(
    logits: torch.Tensor,
    requests: Sequence[ScheduledRequest],
    grammar_bitmask: GrammarBitmask | None,
) -> None:
    """Set the logits of the tokens each constrained request's grammar forbids to -inf.

    Args:
        logits: (num_requests, vocab) edited in place; row i belongs to requests[i].
        grammar_bitmask: rows for some of `requests` (see `GrammarBitmask`); None: no-op.
    """
    if grammar_bitmask is None:
        return
    row_of = {r.request_id: i for i, r in enumerate(requests)}
    rows = [row_of[request_id] for request_id in grammar_bitmask.request_ids]
    vocab_size = logits.shape[-1]
    words = torch.from_numpy(grammar_bitmask.bitmask).to(logits.device)  # (n, num_words)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)  # (32,)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)  # (n, num_words * 32)
    allowed = allowed[:, :vocab_size]  # (n, vocab); the mask covers at least the vocabulary
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))  # (n, vocab)
