"""Outputs as deltas between a replica and the ingress (kvserve/cluster/wire.py): what the
ingress rebuilds equals what the engine made, step after step, and a delta carries only
what changed."""

import copy
import pickle

from kvserve.cluster.wire import Packer, Unpacker
from kvserve.outputs import CompletionOutput, Logprob, RequestOutput


def step_outputs() -> list[RequestOutput]:
    """A request with two samples over four steps, the engine's way: lists appended in
    place (the logprobs list is shared between the outputs), one sample's text cut back by
    a stop string, prompt logprobs arriving with the first token."""
    logprobs: list[dict[int, Logprob]] = []
    outputs = []
    tokens, text = [], ""
    for step in range(4):
        tokens.append(10 + step)
        text += f"w{step} "
        logprobs.append({10 + step: Logprob(-0.5 * step, 1, f"w{step}")})
        stopped = step == 3
        samples = [
            CompletionOutput(0, text, list(tokens), -1.0 * step, logprobs),
            CompletionOutput(
                1,
                "ab" if stopped else "abc" * (step + 1),  # a stop string cut it back
                [5] * (step + 1),
                finish_reason="stop" if stopped else None,
                stop_reason="c" if stopped else None,
            ),
        ]
        outputs.append(
            RequestOutput(
                "r1",
                "the prompt",
                [1, 2, 3, 4],
                samples,
                finished=stopped,
                num_cached_tokens=2,
                prompt_logprobs=[None, {2: Logprob(-1.0, 1)}],
                num_cached_tokens_by_tier={"pool": 2},
            )
        )
        outputs[-1] = copy.deepcopy(outputs[-1])  # what it was when that step ended
    return outputs


def test_unpacked_outputs_equal_the_engines_at_every_step():
    packer, unpacker = Packer(), Unpacker()
    for output in step_outputs():
        delta = pickle.loads(pickle.dumps(packer.pack(output)))  # as Ray carries it
        assert unpacker.unpack(delta) == output


def test_a_delta_carries_the_prompt_once_and_only_new_tokens():
    packer = Packer()
    first, second, *_ = step_outputs()
    packer.pack(first)
    delta = packer.pack(second)
    assert delta.prompt is None
    sample = delta.samples[0]
    assert (sample.token_start, sample.token_ids) == (1, [11])
    assert (sample.text_start, sample.text) == (3, "w1 ")
    assert sample.logprob_start == 1 and sample.logprobs is not None
    assert list(sample.logprobs[0]) == [11]


def test_text_that_shrank_is_sent_whole():
    packer = Packer()
    *_, third, last = step_outputs()
    packer.pack(third)
    sample = packer.pack(last).samples[1]
    assert (sample.text_start, sample.text) == (0, "ab")


def test_outputs_skipped_between_takes_still_unpack():
    """The replica's outbox keeps only a request's newest output between takes."""
    outputs = step_outputs()
    packer, unpacker = Packer(), Unpacker()
    for output in (outputs[0], outputs[3]):
        assert unpacker.unpack(packer.pack(output)) == output
