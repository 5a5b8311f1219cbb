"""Which prompt positions the scheduler names for scoring (no model): each exactly once,
in order, across chunks, forks, preemption and cache_mode "none"; and how the output
processor merges the rows of several samples."""

from __future__ import annotations

import pytest

from kvserve.engine.output_processor import OutputProcessor
from kvserve.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.engine.scheduler_output import ModelRunnerOutput, PromptLogprobRows, TokenLogprobs
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.outputs import Logprob
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=1)


def test_chunks_name_each_position_once_and_never_the_last_prompt_token() -> None:
    request = Request("r", list(range(10)), PARAMS)
    assert request.max_prefix_hit_tokens == 0
    chunks = [(0, 4), (4, 4), (8, 2), (10, 1)]  # the last: a decode
    assert [request.take_prompt_logprob_positions(s, n) for s, n in chunks] == [
        range(0, 4), range(4, 8), range(8, 9), range(0)
    ]  # fmt: skip
    assert request.max_prefix_hit_tokens == 9  # scored: a resume may hit all but the last
    assert request.take_prompt_logprob_positions(0, 11) == range(0)  # recompute: nothing new
    plain = Request("p", list(range(10)), SamplingParams(max_tokens=4))
    assert plain.take_prompt_logprob_positions(0, 10) == range(0)
    assert plain.max_prefix_hit_tokens == 9


def make_scheduler(num_blocks: int, budget: int, cache_mode: str = "paged") -> Scheduler:
    manager = KVCacheManager(num_blocks, 4, max_model_len=64, cache_mode=cache_mode)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=64)
    return Scheduler(config, manager)


def run(scheduler: Scheduler) -> dict[str, list[int]]:
    """Step with a fake model to the end; every request id -> positions named, in order."""
    named: dict[str, list[int]] = {}
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        for entry in output.scheduled:
            named.setdefault(entry.request_id, []).extend(entry.prompt_logprob_positions)
        sampled = [entry.request_id for entry in output.scheduled if entry.sample]
        scheduler.update_from_output(
            output, ModelRunnerOutput(sampled, [7] * len(sampled), [None] * len(sampled))
        )
        scheduler.check_invariants()
    return named


@pytest.mark.parametrize("cache_mode", ["paged", "none"])
def test_forks_the_parent_scores_the_prompt_and_the_samples_nothing(cache_mode: str) -> None:
    scheduler = make_scheduler(num_blocks=32, budget=4 if cache_mode == "paged" else 64,
                               cache_mode=cache_mode)  # fmt: skip
    scheduler.add_request_group([Request(f"s{i}", list(range(10)), PARAMS) for i in range(3)])
    named = run(scheduler)
    if cache_mode == "paged":  # forks share the parent's blocks
        assert named == {"s0": list(range(9)), "s1": [], "s2": []}
    else:  # no sharing: each sample runs (and scores) on its own, once
        assert named == {f"s{i}": list(range(9)) for i in range(3)}


def test_preemption_by_recompute_names_no_position_twice() -> None:
    scheduler = make_scheduler(num_blocks=9, budget=64)  # 8 usable blocks of 4
    for name in ("a", "b"):
        scheduler.add_request(Request(name, list(range(10)), PARAMS.replace(max_tokens=12)))
    named = run(scheduler)
    assert scheduler.num_preemptions > 0
    assert named == {"a": list(range(9)), "b": list(range(9))}


def row(token_id: int, logprob: float) -> TokenLogprobs:
    return TokenLogprobs(token_id, logprob, 1, [token_id], [logprob])


def test_output_processor_keeps_the_longest_prefix_any_sample_delivered() -> None:
    processor = OutputProcessor(tokenizer=None)
    children = [Request(f"u#{i}", [5, 6, 7, 8], PARAMS) for i in range(2)]
    processor.add_request("u", None, children)

    def deliver(child_id: str, start: int, tokens: list[int]) -> None:
        rows = PromptLogprobRows(start, [row(t, -float(t)) for t in tokens])
        processor.detokenize([], ModelRunnerOutput(prompt_logprobs={child_id: rows}))

    deliver("u#1", 0, [6, 7])
    deliver("u#0", 0, [6])  # behind: adds nothing
    deliver("u#0", 1, [7, 8])  # overlaps by one: adds position 2's row
    (output,) = processor.make_outputs([children[0]])
    assert output.prompt_logprobs == [
        None,
        {6: Logprob(-6.0, 1, None)},
        {7: Logprob(-7.0, 1, None)},
        {8: Logprob(-8.0, 1, None)},
    ]
    with pytest.raises(AssertionError, match="skip rows"):
        deliver("u#1", 5, [9])
