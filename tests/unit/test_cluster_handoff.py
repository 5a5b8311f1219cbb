"""The handoff plan of prefill/decode disaggregation (kvserve/cluster/handoff.py): which
samples continue on the decode engine, and how the two engines' outputs are merged."""

import dataclasses

import pytest

from kvserve.cluster.handoff import (
    HANDOFF_CPU_BYTES,
    handoff_config,
    head_params,
    merge,
    plan,
)
from kvserve.config import EngineConfig
from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.sampling_params import SamplingParams


def output(*completions: CompletionOutput, finished: bool = True) -> RequestOutput:
    return RequestOutput("r", "p", [1, 2, 3], list(completions), finished, num_cached_tokens=16)


def test_the_prefill_engine_runs_each_sample_to_its_first_token():
    params = SamplingParams(max_tokens=20, min_tokens=5, n=3, seed=4)
    head = head_params(params)
    assert (head.max_tokens, head.min_tokens, head.n, head.seed) == (1, 1, 3, 4)
    assert head_params(SamplingParams(max_tokens=9)).min_tokens == 0


def test_samples_capped_at_one_token_continue_and_ended_ones_do_not():
    first = output(
        CompletionOutput(0, "a", [7], finish_reason="length"),
        CompletionOutput(1, "", [2], finish_reason="stop", stop_reason=2),  # EOS at once
        CompletionOutput(2, "b", [9], finish_reason="length"),
    )
    head, samples = plan(first, SamplingParams(max_tokens=8, n=3))
    assert samples is not None and [(s.index, s.token_ids) for s in samples] == [(0, [7]), (2, [9])]
    assert not head.finished
    assert [o.finish_reason for o in head.outputs] == [None, "stop", None]
    assert plan(first, SamplingParams(max_tokens=1, n=3)) == (first, None)  # P's is final


def test_decode_outputs_are_merged_with_the_ended_samples_and_prefill_fields():
    head = output(
        CompletionOutput(0, "a", [7]), CompletionOutput(1, "", [2], finish_reason="stop"),
        finished=False,
    )  # fmt: skip
    head = dataclasses.replace(head, prompt_logprobs=[None, {3: None}])
    later = RequestOutput("r", "p", [1, 2, 3], [CompletionOutput(0, "abc", [7, 8, 9])], False)
    merged = merge(head, later)
    assert [(o.index, o.text) for o in merged.outputs] == [(0, "abc"), (1, "")]
    assert merged.prompt_logprobs == head.prompt_logprobs and merged.num_cached_tokens == 16
    assert not merged.finished


def test_handoff_config_gives_each_engine_a_staging_tier_or_needs_the_shared_one():
    config = EngineConfig(model="m")
    assert handoff_config(config, 1, 2, "object-store").kv_cpu_bytes == HANDOFF_CPU_BYTES
    mine = dataclasses.replace(config, kv_cpu_bytes=1 << 20)
    assert handoff_config(mine, 1, 2, "object-store").kv_cpu_bytes == 1 << 20
    with pytest.raises(ValueError, match="kv_transfer: shared-pool"):
        handoff_config(config, 1, 2, "shared-pool")
    with pytest.raises(ValueError, match="kv_transfer: must be one of"):
        handoff_config(config, 1, 2, "carrier-pigeon")
    with pytest.raises(ValueError, match="prefill_replicas: .* no decode replica"):
        handoff_config(config, 2, 2, "object-store")
