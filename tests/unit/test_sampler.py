"""Sampler: greedy, seeded and batch-independent sampling, filters, penalties, logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from kvserve.engine.logits_processors import apply_penalties
from kvserve.engine.sampler import Sampler, apply_top_k_top_p
from kvserve.engine.scheduler_output import ScheduledRequest
from kvserve.sampling_params import SamplingParams

VOCAB = 64


def _request(
    params: SamplingParams,
    prompt: Sequence[int] = (5, 6, 7),
    output: Sequence[int] = (),
    eos: frozenset[int] = frozenset({2}),
) -> ScheduledRequest:
    return ScheduledRequest(
        request_id="r",
        token_ids=[list(prompt + tuple(output))[-1]],
        num_computed_tokens=len(prompt) + len(output) - 1,
        block_ids=[],
        sample=True,
        sampling_params=params,
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        eos_token_ids=eos,
    )


def _logits(n: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _sample(logits: torch.Tensor, params: SamplingParams, seed: int = 0, **kw) -> list[int]:
    requests = [_request(params, **kw) for _ in range(logits.shape[0])]
    return Sampler(seed=seed)(logits, requests).token_ids


GREEDY = SamplingParams(temperature=0.0)


def test_greedy_is_argmax_and_leaves_logits_alone() -> None:
    logits = _logits(6)
    before = logits.clone()
    assert _sample(logits, GREEDY) == logits.argmax(-1).tolist()
    with_lp = Sampler()(logits, [_request(SamplingParams(temperature=0.0, logprobs=2))] * 6)
    assert with_lp.token_ids == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=0.8, top_k=5, seed=99),
        SamplingParams(temperature=1.0, top_p=0.7, repetition_penalty=1.2),
        SamplingParams(temperature=0.5, min_p=0.1, logprobs=3),
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=2.0, top_k=10, top_p=0.9, min_p=0.05),
    ]
    for seed in range(40):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        row = _logits(1, seed=1000 + seed)
        mine = _request(params, output=[3] * (seed % 5))
        alone = Sampler(seed=1)(row, [mine]).token_ids[0]
        batch = torch.cat([_logits(4, seed=seed), row, _logits(3, seed=-seed - 1)])
        requests = [_request(p) for p in others[:4]] + [mine] + [_request(p) for p in others[4:]]
        assert Sampler(seed=2)(batch, requests).token_ids[4] == alone
        assert Sampler(seed=3)(row, [mine]).token_ids[0] == alone


def test_seed_depends_on_step_and_seed() -> None:
    row = torch.zeros(1, VOCAB)  # uniform: every draw is fresh noise
    by_step = {
        Sampler()(row, [_request(SamplingParams(seed=1), output=[9] * s)]).token_ids[0]
        for s in range(20)
    }
    by_seed = {Sampler()(row, [_request(SamplingParams(seed=s))]).token_ids[0] for s in range(20)}
    assert len(by_step) > 5 and len(by_seed) > 5


def test_unseeded_rows_use_the_sampler_generator() -> None:
    logits = torch.zeros(32, VOCAB)
    params = SamplingParams(temperature=1.0)
    assert _sample(logits, params, seed=5) == _sample(logits, params, seed=5)
    assert _sample(logits, params, seed=5) != _sample(logits, params, seed=6)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=1.0),
        SamplingParams(temperature=1e-7),
    ],
)
def test_degenerate_filters_equal_greedy(params: SamplingParams) -> None:
    logits = _logits(200, seed=3)
    assert _sample(logits, params) == logits.argmax(-1).tolist()


def test_min_p_keeps_only_likely_tokens() -> None:
    # probabilities 0.4, 0.3, 0.2, 0.1 ; min_p 0.45 keeps p >= 0.18: tokens 0, 1, 2.
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(3000, 4).contiguous()
    counts = torch.bincount(torch.tensor(_sample(logits, SamplingParams(min_p=0.45))), minlength=4)
    assert counts[3] == 0 and (counts[:3] > 0).all()
    freq = counts[:3].float() / counts.sum()
    torch.testing.assert_close(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9]), atol=0.04, rtol=0)


def test_top_k_keeps_the_k_best() -> None:
    logits = _logits(1, seed=11, vocab=16).expand(2000, 16).contiguous()
    best = set(logits[0].topk(3).indices.tolist())
    assert set(_sample(logits, SamplingParams(top_k=3))) == best


def _reference_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor):
    """vLLM's full-sort version."""
    sorted_logits, order = logits.sort(dim=-1)
    kth = sorted_logits.gather(1, (logits.shape[-1] - k).unsqueeze(1))
    sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p.unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def test_top_k_top_p_matches_a_full_sort() -> None:
    vocab = 5000
    # Peaked rows fit in the first candidates; flat rows (scale 0.1) force widening.
    logits = torch.cat([_logits(6, seed=5, vocab=vocab), _logits(6, seed=6, vocab=vocab) / 30])
    k = torch.tensor([1, 40, vocab, vocab, 300, vocab] * 2)
    p = torch.tensor([1.0, 0.9, 0.5, 0.95, 0.99, 1e-6] * 2)
    ours = apply_top_k_top_p(logits, k, p)
    reference = _reference_top_k_top_p(logits, k, p)
    assert torch.equal(ours.isfinite(), reference.isfinite())
    assert torch.equal(ours[ours.isfinite()], logits[ours.isfinite()])
    kept = ours.isfinite().sum(-1).tolist()
    assert kept[0] == 1 and kept[1] <= 40 and kept[9] > 2000  # the widening was exercised


def _chi_square(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_sampling_follows_softmax() -> None:
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -0.2])
    logits = base.expand(20000, 8).contiguous()
    samples = _sample(logits, SamplingParams(temperature=0.7), seed=1234)
    critical = 24.3  # chi-square, 7 degrees of freedom, p = 0.001
    assert _chi_square(samples, torch.softmax(base / 0.7, -1)) < critical
    # The same samples clearly reject the untempered distribution: the test can fail.
    assert _chi_square(samples, torch.softmax(base, -1)) > 10 * critical


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]])
    cases = [
        (SamplingParams(repetition_penalty=2.0), [1.0, -2.0, 0.5, 1.5, -4.0]),
        (SamplingParams(frequency_penalty=0.5), [2.0, -1.0, 0.5, 2.0, -2.5]),
        (SamplingParams(presence_penalty=0.5), [2.0, -1.0, 0.5, 2.5, -2.5]),
        (
            SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
            [1.0, -2.0, 0.5, 1.5 - 1.0 - 0.25, -4.0 - 0.5 - 0.25],
        ),
    ]
    for params, expected in cases:
        x = logits.clone()
        # Row 0 is penalized (prompt 0, 1; output 3, 3, 4); row 1 has no penalties.
        apply_penalties(
            x,
            [
                _request(params, prompt=(0, 1), output=(3, 3, 4)),
                _request(SamplingParams(), prompt=(0, 1), output=(3, 3, 4)),
            ],
        )
        torch.testing.assert_close(x[0], torch.tensor(expected))
        assert torch.equal(x[1], logits[1])


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0, 2.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(logits, [_request(params, prompt=(0,), output=(3,))]).token_ids == [4]
    assert Sampler()(logits, [_request(params, prompt=(0,), output=(1,))]).token_ids == [3]


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.0, 0.0, 8.0, 3.0]])  # EOS 2 best, stop id 5 next
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    assert Sampler()(logits, [_request(params, output=(1,))]).token_ids == [6]
    assert Sampler()(logits, [_request(params, output=(1, 1, 1))]).token_ids == [2]
    sampled = SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[5])
    tokens = _sample(logits.expand(500, 7), sampled, output=(1,))
    assert not {2, 5} & set(tokens)


def test_ignore_eos_never_masks_eos() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.0, 0.0, 8.0, 3.0]])
    plain = SamplingParams(temperature=0.0, ignore_eos=True)
    assert Sampler()(logits, [_request(plain)]).token_ids == [2]
    with_min = SamplingParams(temperature=0.0, ignore_eos=True, min_tokens=3, stop_token_ids=[5])
    assert Sampler()(logits, [_request(with_min, output=(1,))]).token_ids == [2]


def test_logprobs_come_from_raw_logits() -> None:
    logits = _logits(3, seed=21)
    requests = [
        _request(
            SamplingParams(temperature=0.3, logprobs=5, seed=1, repetition_penalty=1.5),
            output=(int(logits[0].argmax()),),
        ),
        _request(SamplingParams(temperature=0.0)),
        _request(SamplingParams(temperature=2.0, logprobs=0, presence_penalty=2.0, seed=4)),
    ]
    out = Sampler()(logits, requests)
    raw = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    for row in (0, 2):
        entry = out.logprobs[row]
        token = out.token_ids[row]
        assert entry is not None and entry.token_id == token
        assert entry.logprob == pytest.approx(float(raw[row, token]), abs=1e-6)
        assert entry.rank == int((raw[row] > raw[row, token]).sum()) + 1
        k = requests[row].sampling_params.logprobs
        values, ids = raw[row].topk(k)
        assert entry.top_token_ids == ids.tolist()
        assert entry.top_logprobs == pytest.approx(values.tolist(), abs=1e-6)
        assert entry.top_logprobs == sorted(entry.top_logprobs, reverse=True)
    assert out.logprobs[2].top_token_ids == []


def test_rank_of_a_token_that_is_not_the_raw_best() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    params = SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=2.0)
    out = Sampler()(logits, [_request(params, prompt=(0,))])
    assert out.token_ids == [1]
    entry = out.logprobs[0]
    assert entry.rank == 2 and entry.top_token_ids == [0, 1]
    expected = 2.9 - math.log(sum(math.exp(v) for v in (3.0, 2.9, 0.0, -1.0)))
    assert entry.logprob == pytest.approx(expected, abs=1e-5)


def test_logit_bias_forces_and_bans_tokens_greedy_and_sampled() -> None:
    """+100 makes a token win (greedy and sampled), -100 bans the raw argmax; the plain-greedy
    fast path does not skip a biased row, and an unbiased row in the batch is untouched."""
    logits = _logits(4, seed=5)
    worst = logits.argmin(-1).tolist()
    best = logits.argmax(-1).tolist()
    for temperature in (0.0, 1.0):
        force = [SamplingParams(temperature=temperature, logit_bias={w: 100.0}) for w in worst]
        assert Sampler(seed=3)(logits, [_request(p) for p in force]).token_ids == worst
    ban = SamplingParams(temperature=0.0, logit_bias={best[0]: -100.0})
    chosen = Sampler()(logits[:2], [_request(ban), _request(GREEDY)]).token_ids
    assert chosen[0] != best[0] and chosen[0] == logits[0].topk(2).indices[1].item()
    assert chosen[1] == best[1]


def test_logit_bias_leaves_logprobs_raw() -> None:
    logits = _logits(1, seed=6)
    worst = int(logits.argmin())
    plain = Sampler()(logits, [_request(SamplingParams(temperature=0.0, logprobs=2))])
    biased_params = SamplingParams(temperature=0.0, logprobs=2, logit_bias={worst: 100.0})
    biased = Sampler()(logits, [_request(biased_params)])
    assert biased.token_ids == [worst]
    assert plain.logprobs[0] is not None and biased.logprobs[0] is not None
    assert biased.logprobs[0].top_token_ids == plain.logprobs[0].top_token_ids
    assert biased.logprobs[0].top_logprobs == plain.logprobs[0].top_logprobs
    expected = torch.log_softmax(logits[0], dim=-1)[worst].item()
    assert biased.logprobs[0].logprob == pytest.approx(expected, abs=1e-6)
    assert biased.logprobs[0].rank == VOCAB
