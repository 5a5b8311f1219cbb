"""Structured output pieces: grammar compile and validation, the matcher life cycle, the mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvserve.engine.logits_processors import apply_token_bitmask
from kvserve.engine.sampler import Sampler
from kvserve.engine.scheduler_output import GrammarBitmask, ScheduledRequest
from kvserve.engine.structured_output import StructuredOutputManager
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams, StructuredOutputParams
from tests.tiny_tokenizer import EOS_TOKEN_ID, save_tiny_tokenizer

MODEL_VOCAB = 320  # > the tokenizer's 300: ids 300.. have no text


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    from transformers import AutoTokenizer

    folder: Path = tmp_path_factory.mktemp("tiny_tokenizer")
    save_tiny_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def manager(tokenizer: object) -> StructuredOutputManager:
    return StructuredOutputManager(tokenizer, {EOS_TOKEN_ID}, MODEL_VOCAB)


def _scheduled(request_id: str, sample: bool = True) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=request_id,
        token_ids=[5],
        num_computed_tokens=3,
        block_ids=[],
        sample=sample,
        sampling_params=SamplingParams(temperature=0.0),
        prompt_token_ids=[1, 2, 3, 5],
        output_token_ids=[],
        eos_token_ids=frozenset({EOS_TOKEN_ID}),
    )


def _allowed(bitmask: GrammarBitmask, row: int) -> list[int]:
    bits = np.unpackbits(bitmask.bitmask[row].view(np.uint8), bitorder="little")
    return np.flatnonzero(bits).tolist()


def _add(manager: StructuredOutputManager, request_id: str, so: StructuredOutputParams) -> None:
    params = SamplingParams(structured_output=so)
    manager.add_requests([Request(request_id, [1, 2, 3], params)])


@pytest.mark.parametrize(
    ("so", "field"),
    [
        (StructuredOutputParams(json={"type": "wat"}), "structured_output.json"),
        (StructuredOutputParams(json='{"$ref": "#/nowhere"}'), "structured_output.json"),
        (StructuredOutputParams(regex="a(b"), "structured_output.regex"),
        (StructuredOutputParams(grammar="start: undefined_rule"), "structured_output.grammar"),
    ],
)
def test_bad_constraint_is_a_value_error_naming_the_field(
    manager: StructuredOutputManager, so: StructuredOutputParams, field: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        manager.check(so)


def test_no_tokenizer_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^structured_output: this model has no tokenizer"):
        StructuredOutputManager(None, {0}, 256).check(StructuredOutputParams(regex="a"))


def test_choice_allows_exactly_its_strings_then_stops(
    manager: StructuredOutputManager, tokenizer: object
) -> None:
    choices = ['say "hi"', "back\\slash", "ünï"]
    for index, choice in enumerate(choices):
        request_id = f"r{index}"
        _add(manager, request_id, StructuredOutputParams(choice=choices))
        token_ids = tokenizer.encode(choice)  # type: ignore[attr-defined]
        statuses = [manager.accept_token(request_id, t) for t in token_ids]
        assert statuses == [None] * (len(token_ids) - 1) + [RequestStatus.FINISHED_STOPPED]
    _add(manager, "other", StructuredOutputParams(choice=choices))
    assert manager.accept_token("other", tokenizer.encode("x")[0]) == RequestStatus.FINISHED_ABORTED  # type: ignore[attr-defined]


def test_bitmask_rows_of_sampled_constrained_requests_only(
    manager: StructuredOutputManager, tokenizer: object
) -> None:
    _add(manager, "a", StructuredOutputParams(regex="[0-9]+"))
    _add(manager, "b", StructuredOutputParams(choice=["yes"]))
    scheduled = [_scheduled("free"), _scheduled("b"), _scheduled("a", sample=False)]
    bitmask = manager.grammar_bitmask(scheduled)
    assert bitmask is not None
    assert bitmask.request_ids == ["b"]
    assert bitmask.bitmask.shape == (1, MODEL_VOCAB // 32)
    allowed = [tokenizer.decode([t]) for t in _allowed(bitmask, 0)]  # type: ignore[attr-defined]
    assert allowed and all("yes".startswith(text) for text in allowed)
    # "a" accepts digits, then EOS once it holds one; ids past the tokenizer never.
    digits = _allowed(manager.grammar_bitmask([_scheduled("a")]), 0)  # type: ignore[arg-type]
    assert EOS_TOKEN_ID not in digits and max(digits) < 300
    assert all(tokenizer.decode([t]).isdigit() for t in digits)  # type: ignore[attr-defined]
    assert manager.accept_token("a", digits[0]) is None
    after = _allowed(manager.grammar_bitmask([_scheduled("a")]), 0)  # type: ignore[arg-type]
    assert after == [EOS_TOKEN_ID, *digits]
    assert manager.accept_token("a", EOS_TOKEN_ID) == RequestStatus.FINISHED_STOPPED
    manager.free("a")
    manager.free("b")
    assert manager.num_requests == 0
    assert manager.grammar_bitmask([_scheduled("a")]) is None


def test_samples_of_one_request_get_independent_matchers(
    manager: StructuredOutputManager, tokenizer: object
) -> None:
    params = SamplingParams(n=2, structured_output=StructuredOutputParams(choice=["ab", "cd"]))
    children = [Request(f"r#{i}", [1, 2], params.for_child(i)) for i in range(2)]
    manager.add_requests(children)
    a, c = tokenizer.encode("a")[0], tokenizer.encode("c")[0]  # type: ignore[attr-defined]
    assert manager.accept_token("r#0", a) is None
    assert manager.accept_token("r#1", c) is None  # r#0 consuming "a" did not move r#1


def test_apply_token_bitmask_sets_forbidden_logits_to_minus_inf() -> None:
    vocab = 70  # 3 words, the last one partly past the vocabulary
    allowed = {0: [0, 31, 32, 69], 2: [5, 63]}
    bitmask = np.zeros((2, 3), dtype=np.int32)
    for row, ids in enumerate(allowed.values()):
        for token in ids:
            bitmask[row, token // 32] |= np.int32(np.uint32(1 << (token % 32)).view(np.int32))
    logits = torch.randn(3, vocab)
    before = logits.clone()
    requests = [_scheduled("x"), _scheduled("y"), _scheduled("z")]
    apply_token_bitmask(logits, requests, GrammarBitmask(["x", "z"], bitmask))
    for row, ids in allowed.items():
        finite = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert finite == ids
        assert torch.equal(logits[row, ids], before[row, ids])
    assert torch.equal(logits[1], before[1])  # unconstrained row untouched


def test_greedy_fast_path_and_logprobs_respect_the_mask() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])  # (1, vocab 4): argmax 1
    bitmask = GrammarBitmask(["x"], np.array([[0b1100]], dtype=np.int32))  # tokens 2, 3
    plain = Sampler()(logits, [_scheduled("x")], bitmask)
    assert plain.token_ids == [3]
    request = _scheduled("x")
    request.sampling_params = SamplingParams(temperature=0.0, logprobs=1)
    with_lp = Sampler()(logits, [request], bitmask)
    assert with_lp.token_ids == [3]
    logprobs = with_lp.logprobs[0]
    assert logprobs is not None and logprobs.top_token_ids == [1]  # raw logits: 1 is best
    assert logprobs.logprob == pytest.approx(torch.log_softmax(logits[0], -1)[3].item())
    draws = set()
    for seed in range(30):
        request.sampling_params = SamplingParams(temperature=1.0, seed=seed)
        draws.add(Sampler()(logits, [request], bitmask).token_ids[0])
    assert draws == {2, 3}
