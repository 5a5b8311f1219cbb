"""Beam search on the engine's scheduler: beams fork by sharing KV blocks, never by copying.

The algorithm is transformers' `generate(num_beams=W, do_sample=False)` (with its
`length_penalty` and its default `early_stopping=False` heuristic), so the two agree token for
token. Each step, for every prompt's group of running beams:

    candidates  top K of  cum_logprob(beam) + log p(token | beam)  over all (beam, token),
                K = (1 + number of eos ids) * W, so at least W of them do not end in eos
    finished    a candidate ending in eos (or reaching max_tokens) among the first W becomes a
                hypothesis scored cum_logprob / num_tokens ** length_penalty; the W best are kept
    running     the W best candidates that did not finish
    stop        when every candidate finished, or all W hypotheses are in and the best running
                beam's score at its current length cannot beat the worst of them

Each running beam is a `Request` the scheduler runs like any other. The sampler's token for it
(greedy, with the top K logprobs) is a placeholder: once every beam of the group has its
logprobs, the first chosen continuation of a beam replaces that token and each further one
forks the request (`Scheduler.fork_request`), sharing every block; unchosen beams end and
release their references. A beam writes only into its own last block (copy-on-write), so W
beams cost W tokens of compute per step and only their unshared tail blocks of memory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvserve.engine.prompts import TokenizedPrompt
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams

# SamplingParams caps logprobs at 20 (OpenAI's top_logprobs limit); so does vLLM by default.
MAX_LOGPROBS = 20

if TYPE_CHECKING:
    from kvserve.engine.engine import Engine


@dataclass
class BeamSequence:
    """One finished hypothesis: its generated tokens (eos included when it ended on eos)."""

    token_ids: list[int]
    cum_logprob: float
    score: float  # cum_logprob / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" (eos) or "length" (max_tokens)
    text: str = ""


@dataclass
class BeamSearchOutput:
    """The `beam_width` best hypotheses of one prompt, best first."""

    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]


@dataclass
class _Beam:
    request_id: str
    token_ids: list[int]
    cum_logprob: float


@dataclass
class _Group:
    """One prompt's beams and hypotheses."""

    prompt_token_ids: list[int]
    cache_salt: str | None = None
    beams: list[_Beam] = field(default_factory=list)
    hypotheses: list[BeamSequence] = field(default_factory=list)
    improvable: bool = True  # transformers' early-stop heuristic, once False stays False
    done: bool = False


class BeamSearch:
    """Runs beam search for a list of prompts on an otherwise idle engine.

    At most `max_num_seqs // beam_width` prompts run at once; the others wait their turn.

    Raises:
        ValueError: beam_width < 1 or above max_num_seqs, max_tokens < 1, a non-finite
            length_penalty, or a prompt the engine rejects (the message names the field).
        RuntimeError: the engine is running other requests.
    """

    def __init__(
        self,
        engine: Engine,
        beam_width: int,
        max_tokens: int,
        length_penalty: float = 1.0,
        ignore_eos: bool = False,
    ) -> None:
        if not isinstance(beam_width, int) or beam_width < 1:
            raise ValueError(f"beam_width: must be an integer >= 1, got {beam_width!r}")
        if beam_width > engine.config.max_num_seqs:
            raise ValueError(
                f"beam_width: {beam_width} beams do not fit in max_num_seqs "
                f"{engine.config.max_num_seqs}"
            )
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens: must be an integer >= 1, got {max_tokens!r}")
        if not math.isfinite(length_penalty):
            raise ValueError(f"length_penalty: must be finite, got {length_penalty!r}")
        if engine.has_unfinished_requests():
            raise RuntimeError("beam search needs an idle engine: other requests are running")
        self.engine = engine
        self.scheduler = engine.scheduler
        self.beam_width = beam_width
        self.max_tokens = max_tokens
        self.length_penalty = length_penalty
        self.eos_token_ids = frozenset() if ignore_eos else engine.eos_token_ids
        self.num_candidates = max(2, 1 + len(self.eos_token_ids)) * beam_width
        if self.num_candidates > MAX_LOGPROBS:
            per_beam = self.num_candidates // beam_width
            raise ValueError(
                f"beam_width: at most {MAX_LOGPROBS // per_beam} with this model's "
                f"{len(self.eos_token_ids)} eos token(s) ({per_beam} candidates per beam come "
                f"from the sampler's top-{MAX_LOGPROBS} logprobs), got {beam_width}"
            )
        self.params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=self.num_candidates
        )
        self._ids = itertools.count()

    def run(self, prompts: Sequence[list[int] | TokenizedPrompt]) -> list[list[BeamSequence]]:
        """The hypotheses of every prompt (token ids, or tokenized with a cache salt), best
        first, in input order."""
        tokenized = [
            p if isinstance(p, TokenizedPrompt) else TokenizedPrompt(None, p) for p in prompts
        ]
        for prompt in tokenized:
            self.engine.validate(prompt.prompt_token_ids, self.params)
        groups = [_Group(list(p.prompt_token_ids), p.cache_salt) for p in tokenized]
        max_active = self.engine.config.max_num_seqs // self.beam_width
        queue = list(reversed(groups))
        active: list[_Group] = []
        arrived: dict[str, tuple[list[int], list[float]]] = {}
        try:
            while queue or active:
                while queue and len(active) < max_active:
                    active.append(self._start(queue.pop()))
                scheduled, model_output, _ = self.engine.step_model()
                if scheduled.is_empty and not self.scheduler.preempt_held():
                    raise RuntimeError("beam search made no progress (KV pool too small?)")
                for request_id, logprobs in zip(
                    model_output.request_ids, model_output.logprobs, strict=True
                ):
                    assert logprobs is not None, "beam requests always ask for logprobs"
                    arrived[request_id] = (logprobs.top_token_ids, logprobs.top_logprobs)
                    self.scheduler.hold(request_id)
                for group in active:
                    if all(beam.request_id in arrived for beam in group.beams):
                        self._advance(group, arrived)
                active = [group for group in active if not group.done]
        finally:
            self._end([beam.request_id for group in groups for beam in group.beams])
        return [sorted(g.hypotheses, key=lambda h: h.score, reverse=True) for g in groups]

    def _start(self, group: _Group) -> _Group:
        request_id = self._new_id()
        request = Request(
            request_id, group.prompt_token_ids, self.params, cache_salt=group.cache_salt
        )
        self.scheduler.add_request(request)
        group.beams = [_Beam(request_id, [], 0.0)]
        return group

    def _advance(self, group: _Group, arrived: dict[str, tuple[list[int], list[float]]]) -> None:
        """One beam-search step of a group whose beams all have their logprobs."""
        candidates = []  # (cum_logprob, beam index, token), best first; ties keep beam order
        for index, beam in enumerate(group.beams):
            token_ids, logprobs = arrived.pop(beam.request_id)
            self.scheduler.release(beam.request_id)
            for token_id, logprob in zip(token_ids, logprobs, strict=True):
                candidates.append((beam.cum_logprob + logprob, index, token_id))
        candidates.sort(key=lambda c: c[0], reverse=True)
        candidates = candidates[: self.num_candidates]
        num_tokens = len(group.beams[0].token_ids) + 1
        ends = [t in self.eos_token_ids or num_tokens >= self.max_tokens for _, _, t in candidates]
        if group.improvable:
            self._add_hypotheses(group, candidates, ends, num_tokens)
        chosen = [c for c, end in zip(candidates, ends, strict=True) if not end]
        chosen = chosen[: self.beam_width]
        if chosen and len(group.hypotheses) == self.beam_width:
            best_possible = chosen[0][0] / num_tokens**self.length_penalty
            worst = min(h.score for h in group.hypotheses)
            group.improvable = best_possible > worst
        if not chosen or not group.improvable:
            group.done = True
            self._end([beam.request_id for beam in group.beams])
            group.beams = []
            return
        group.beams = self._continue(group.beams, chosen)

    def _add_hypotheses(
        self,
        group: _Group,
        candidates: list[tuple[float, int, int]],
        ends: list[bool],
        num_tokens: int,
    ) -> None:
        """Finished candidates among the first `beam_width` join the W best hypotheses."""
        for rank in range(min(self.beam_width, len(candidates))):
            if not ends[rank]:
                continue
            cum_logprob, index, token_id = candidates[rank]
            group.hypotheses.append(
                BeamSequence(
                    token_ids=[*group.beams[index].token_ids, token_id],
                    cum_logprob=cum_logprob,
                    score=cum_logprob / num_tokens**self.length_penalty,
                    finish_reason="stop" if token_id in self.eos_token_ids else "length",
                )
            )
        group.hypotheses.sort(key=lambda h: h.score, reverse=True)
        del group.hypotheses[self.beam_width :]

    def _continue(self, beams: list[_Beam], chosen: list[tuple[float, int, int]]) -> list[_Beam]:
        """Turn the chosen continuations into running requests; end the beams left out.

        A beam's first continuation reuses its request (the placeholder token is replaced),
        each further one forks it. Forks happen before any beam ends, so shared blocks keep
        a reference throughout.
        """
        reused: set[int] = set()
        new_beams = []
        for cum_logprob, index, token_id in chosen:
            parent = beams[index]
            if index in reused:
                request_id = self._new_id()
                self.scheduler.fork_request(parent.request_id, request_id, token_id)
            else:
                reused.add(index)
                request_id = parent.request_id
                self.scheduler.replace_last_token(request_id, token_id)
            new_beams.append(_Beam(request_id, [*parent.token_ids, token_id], cum_logprob))
        self._end([b.request_id for i, b in enumerate(beams) if i not in reused])
        return new_beams

    def _end(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def _new_id(self) -> str:
        return f"beam-{next(self._ids)}"
