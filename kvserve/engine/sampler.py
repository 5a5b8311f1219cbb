"""Turn one row of logits per request into its next token (vLLM v1 semantics).

Per step, in this order:

    raw logits ──> logprobs (log_softmax of the raw logits, when asked)
        │
        │  logits processors (logits_processors.py), in place on a float32 copy:
        ├─ penalties: repetition (prompt + output), presence and frequency (output only)
        ├─ logit_bias: added per token id (OpenAI's order: after the penalties)
        ├─ min_tokens: stop and EOS ids masked to -inf until enough tokens are out
        ├─ structured output: tokens the request's grammar forbids masked to -inf
        │
        │  then the choice (this module):
        ├─ greedy rows: argmax
        └─ sampled rows: temperature -> top-k -> top-p -> min-p -> exponential race

A request with a `seed` draws its noise from a generator seeded by (seed, number of output
tokens so far) and used for its row alone, so the same seed and logits give the same token
whatever else is in the batch and however often the request was preempted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kvserve.engine.logits_processors import (
    apply_logit_bias,
    apply_min_tokens,
    apply_penalties,
    apply_token_bitmask,
)
from kvserve.engine.scheduler_output import GrammarBitmask, ScheduledRequest, TokenLogprobs
from kvserve.sampling_params import SamplingParams

# Temperatures below this are greedy (dividing by them would overflow), as in vLLM.
_SAMPLING_EPS = 1e-5
_MASK64 = (1 << 64) - 1
# Top-k / top-p look at this many best candidates first (widened when a row needs more).
_MIN_CANDIDATES = 256


class SamplerOutput(NamedTuple):
    """One sampled token per request, and its logprobs where the request asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    """Samples the next token of every request of a step from its row of logits."""

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        # Noise for requests without their own seed.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        requests: Sequence[ScheduledRequest],
        grammar_bitmask: GrammarBitmask | None = None,
    ) -> SamplerOutput:
        """Sample one token per row.

        Args:
            logits: (num_requests, vocab_size) float32, row i belongs to requests[i].
            requests: the requests being sampled, each with its params and tokens so far.
            grammar_bitmask: allowed tokens of the requests with structured output.
        Returns:
            The token ids, and a `TokenLogprobs` per request whose params set `logprobs`
            (None for the others).
        """
        params = [r.sampling_params for r in requests]
        if grammar_bitmask is None and all(_is_plain_greedy(r) for r in requests):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(requests))
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logits = logits[lp_rows].float() if lp_rows else None  # (num_lp_rows, vocab)
        logits = logits.float().clone()  # (num_requests, vocab), edited in place below
        apply_penalties(logits, requests)
        apply_logit_bias(logits, requests)
        apply_min_tokens(logits, requests)
        apply_token_bitmask(logits, requests, grammar_bitmask)
        token_ids = logits.argmax(dim=-1)  # (num_requests,)
        sampled_rows = [i for i, p in enumerate(params) if not _is_greedy(p)]
        if sampled_rows:
            chosen = [requests[i] for i in sampled_rows]
            token_ids[sampled_rows] = self._sample(logits[sampled_rows], chosen)
        ids = token_ids.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        if raw_logits is not None:
            ks = [params[i].logprobs or 0 for i in lp_rows]
            picked = [ids[i] for i in lp_rows]
            for i, entry in zip(lp_rows, gather_logprobs(raw_logits, ks, picked), strict=True):
                logprobs[i] = entry
        return SamplerOutput(ids, logprobs)

    def _sample(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> torch.Tensor:
        """Draw one token per row of `logits` (num_rows, vocab) after the filters."""
        params = [r.sampling_params for r in requests]
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)  # (n,)
        logits.div_(temperature.unsqueeze(1))  # (n, vocab)
        rows = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
        if rows:
            vocab_size = logits.shape[-1]
            top_k = [
                min(params[i].top_k, vocab_size) if params[i].top_k > 0 else vocab_size
                for i in rows
            ]
            top_k_t = torch.tensor(top_k, device=device)  # (r,)
            top_p_t = torch.tensor([params[i].top_p for i in rows], device=device)  # (r,)
            logits[rows] = apply_top_k_top_p(logits[rows], top_k_t, top_p_t)  # (r, vocab)
        probs = logits.softmax(dim=-1)  # (n, vocab)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)  # (n,)
            probs = apply_min_p(probs, min_p)  # (n, vocab)
        noise = self._exponential_noise(probs.shape, requests)  # (n, vocab)
        return (probs / noise).argmax(dim=-1)  # (n,)

    def _exponential_noise(
        self, shape: torch.Size, requests: Sequence[ScheduledRequest]
    ) -> torch.Tensor:
        """Exp(1) noise: argmax(probs / noise) is a sample of probs (the exponential race).

        Drawn as -log(U) (4x faster than `exponential_` on CPU); U = 0 gives +inf noise, a
        token that cannot win, with probability 2^-24 per token.
        """
        noise = torch.empty(shape, device=self.device)  # (n, vocab)
        if all(r.sampling_params.seed is None for r in requests):
            noise.uniform_(generator=self.generator)
        else:
            for row, request in enumerate(requests):
                noise[row].uniform_(generator=self._generator_for(request))
        return noise.log_().neg_()  # (n, vocab)

    def _generator_for(self, request: ScheduledRequest) -> torch.Generator:
        seed = request.sampling_params.seed
        if seed is None:
            return self.generator
        generator = torch.Generator(device=self.device)
        generator.manual_seed(mix_seed(seed, len(request.output_token_ids)))
        return generator


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep each row's k best logits, then its smallest best-first set with probability >= p.

    A full sort of the vocabulary costs ~4 ms a row on CPU, so this looks at the best
    `width` candidates only and widens them (x8) until every row's kept set fits:

        candidates: [ best ........ width-th ] [ rest of the vocabulary: dropped ]
        top-k row:   k <= width by construction
        top-p row:   the candidates' probability mass already reaches p

    Args:
        logits: (n, vocab); k: (n,) in [1, vocab] (vocab = off); p: (n,) in (0, 1] (1 = off).
    Returns:
        (n, vocab) logits with the dropped tokens at -inf. Top-p uses the probabilities
        renormalized after top-k, as vLLM does.
    """
    vocab_size = logits.shape[-1]
    limited = k < vocab_size  # (n,)
    width = min(vocab_size, max(_MIN_CANDIDATES, int(torch.where(limited, k, 0).max())))
    full_lse = logits.logsumexp(dim=-1, keepdim=True)  # (n, 1)
    while True:
        values, ids = logits.topk(width, dim=-1)  # (n, width), best first
        position = torch.arange(width, device=logits.device)  # (width,)
        values.masked_fill_(position >= k.unsqueeze(1), float("-inf"))  # top-k
        # Probabilities after top-k: rows without top-k normalize over the whole vocabulary.
        lse = torch.where(limited.unsqueeze(1), values.logsumexp(-1, keepdim=True), full_lse)
        probs = (values - lse).exp()  # (n, width)
        mass_before = probs.cumsum(dim=-1) - probs  # (n, width) mass of the better tokens
        covered = limited | (mass_before[:, -1] + probs[:, -1] >= p)  # (n,)
        if width == vocab_size or bool(covered.all()):
            break
        width = min(vocab_size, width * 8)
    drop = (mass_before >= p.unsqueeze(1)) & (p < 1.0).unsqueeze(1)  # (n, width)
    values.masked_fill_(drop, float("-inf"))  # top-p; the best token has mass_before 0
    return torch.full_like(logits, float("-inf")).scatter_(1, ids, values)  # (n, vocab)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens less likely than min_p times the row's top probability, renormalize.

    Args:
        probs: (n, vocab) probabilities; min_p: (n,) in [0, 1].
    """
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # (n, 1)
    kept = probs.masked_fill(probs < threshold, 0.0)  # (n, vocab)
    return kept / kept.sum(dim=-1, keepdim=True)  # (n, vocab)


def gather_logprobs(
    raw_logits: torch.Tensor, ks: Sequence[int], token_ids: Sequence[int]
) -> list[TokenLogprobs]:
    """Logprobs of the raw logits: each row's top-k (best first) and its sampled token's.

    Args:
        raw_logits: (n, vocab) logits before any penalty or temperature.
        ks: how many top tokens each row returns. token_ids: each row's sampled token.
    """
    logprobs = raw_logits.log_softmax(dim=-1)  # (n, vocab)
    top_values, top_ids = logprobs.topk(max(ks), dim=-1)  # (n, max_k)
    picked = torch.tensor(token_ids, device=raw_logits.device).unsqueeze(1)  # (n, 1)
    picked_lp = logprobs.gather(1, picked)  # (n, 1)
    ranks = (logprobs >= picked_lp).sum(dim=-1)  # (n,) 1 = most likely; ties share the rank
    rows = zip(token_ids, picked_lp.squeeze(1).tolist(), ranks.tolist(), ks, strict=True)
    top_values_l, top_ids_l = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(token, lp, rank, top_ids_l[i][:k], top_values_l[i][:k])
        for i, (token, lp, rank, k) in enumerate(rows)
    ]


def mix_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (request seed, output position), splitmix64 style."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < _SAMPLING_EPS


def _is_plain_greedy(request: ScheduledRequest) -> bool:
    """Greedy with nothing else to do: the whole batch can take a single argmax."""
    params = request.sampling_params
    return (
        _is_greedy(params)
        and params.logprobs is None
        and not params.needs_penalties
        and not params.logit_bias
        and len(request.output_token_ids) >= params.min_tokens
    )
