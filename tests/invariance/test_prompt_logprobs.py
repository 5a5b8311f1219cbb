"""Prompt logprobs (`SamplingParams(prompt_logprobs=k)`) through the engine: equal to
transformers' log_softmax over the prompt, and unchanged by chunking, a warm prefix cache,
n > 1, preemption, the cache mode and the KV dtype."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from kvserve.engine.engine import Engine
from kvserve.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from kvserve.outputs import PromptLogprobs, RequestOutput
from kvserve.sampling_params import SamplingParams
from tests.helpers import make_engine, random_prompts, run_engine

K = 3
LENGTHS = [1, 2, 9, 40]
PARAMS = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=K)


@torch.inference_mode()
def hf_prompt_logprobs(hf_model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """(P, vocab) log_softmax of transformers' logits; row i - 1 scores prompt token i."""
    logits = hf_model(torch.tensor([prompt])).logits[0].float()  # (P, vocab)
    return torch.log_softmax(logits, dim=-1)


def assert_matches_oracle(
    prompt_logprobs: PromptLogprobs | None, prompt: list[int], oracle: torch.Tensor, k: int
) -> None:
    """vLLM's shape, and every value within 1e-4 of the oracle's."""
    assert prompt_logprobs is not None
    assert len(prompt_logprobs) == len(prompt)
    assert prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        entry, row, token = prompt_logprobs[i], oracle[i - 1], prompt[i]
        assert entry is not None
        expected = row[token].item()
        assert entry[token].logprob == pytest.approx(expected, abs=1e-4), f"position {i}"
        assert entry[token].rank == int((row >= expected).sum())  # 1 = most likely
        top = torch.topk(row, k)
        top_ids = [t for t in entry if entry[t].rank <= k and t in top.indices.tolist()]
        assert sorted(top_ids) == sorted(top.indices.tolist()), f"position {i}: top-{k}"
        for rank, (token_id, value) in enumerate(
            zip(top.indices.tolist(), top.values.tolist(), strict=True), start=1
        ):
            assert entry[token_id].logprob == pytest.approx(value, abs=1e-4)
            assert entry[token_id].rank == rank
        assert set(entry) == set(top.indices.tolist()) | {token}


def assert_same(a: PromptLogprobs | None, b: PromptLogprobs | None, tol: float = 1e-5) -> None:
    assert a is not None and b is not None and len(a) == len(b)
    assert a[0] is None and b[0] is None
    for entry_a, entry_b in zip(a[1:], b[1:], strict=True):
        assert entry_a is not None and entry_b is not None
        assert set(entry_a) == set(entry_b)
        for token_id, lp in entry_a.items():
            assert lp.logprob == pytest.approx(entry_b[token_id].logprob, abs=tol)
            assert lp.rank == entry_b[token_id].rank


def prompt_logprobs_of(outputs: list[RequestOutput]) -> list[PromptLogprobs | None]:
    return [output.prompt_logprobs for output in outputs]


def test_prompt_logprobs_match_transformers(
    tiny_checkpoints: dict[str, str], hf_models: dict[str, torch.nn.Module]
) -> None:
    """Every tiny architecture (llama variants, mistral's sliding window 8 over 40 tokens,
    qwen2, gpt2), prompts of 1 to 40 tokens in one step."""
    for name, path in tiny_checkpoints.items():
        engine = make_engine(path)
        prompts = random_prompts(engine.model_config.vocab_size, LENGTHS, seed=3)
        outputs = run_engine(engine, prompts, PARAMS)
        for prompt, output in zip(prompts, outputs, strict=True):
            assert_matches_oracle(
                output.prompt_logprobs, prompt, hf_prompt_logprobs(hf_models[name], prompt), K
            )


def test_k_zero_gives_the_prompt_token_alone(
    tiny_checkpoints: dict[str, str], hf_models: dict[str, torch.nn.Module]
) -> None:
    engine = make_engine(tiny_checkpoints["llama"])
    (prompt,) = random_prompts(engine.model_config.vocab_size, [12], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    (output,) = run_engine(engine, [prompt], params)
    assert_matches_oracle(
        output.prompt_logprobs, prompt, hf_prompt_logprobs(hf_models["llama"], prompt), 0
    )
    assert all(entry is not None and len(entry) == 1 for entry in output.prompt_logprobs[1:])


def test_no_prompt_logprobs_unless_asked(tiny_checkpoints: dict[str, str]) -> None:
    engine = make_engine(tiny_checkpoints["llama"])
    outputs = run_engine(engine, [[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2))
    assert outputs[0].prompt_logprobs is None


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
def test_chunked_prefill_equals_whole(
    tiny_checkpoints: dict[str, str], hf_models: dict[str, torch.nn.Module], name: str
) -> None:
    """Chunks of at most 8 tokens (some shared with decodes of other requests) give the same
    prompt logprobs as one step, and transformers' (mistral: window 8, blocks of 4)."""
    whole = make_engine(tiny_checkpoints[name], block_size=4)
    prompts = random_prompts(whole.model_config.vocab_size, [40, 23, 3, 17], seed=5)
    expected = run_engine(whole, prompts, PARAMS)
    chunked = make_engine(tiny_checkpoints[name], block_size=4, max_num_batched_tokens=8)
    outputs = run_engine(chunked, prompts, PARAMS)
    for prompt, got, want in zip(prompts, outputs, expected, strict=True):
        assert_same(got.prompt_logprobs, want.prompt_logprobs)
        assert_matches_oracle(
            got.prompt_logprobs, prompt, hf_prompt_logprobs(hf_models[name], prompt), K
        )


def test_warm_prefix_cache_is_recomputed(tiny_checkpoints: dict[str, str]) -> None:
    """A request asking for prompt logprobs takes no prefix hit (its positions are scored),
    gets the cold result, and its blocks stay cached for later requests."""
    engine = make_engine(tiny_checkpoints["llama"], block_size=4)
    (prompt,) = random_prompts(engine.model_config.vocab_size, [22], seed=6)
    (cold,) = run_engine(engine, [prompt], PARAMS)
    assert cold.num_cached_tokens == 0
    (warm,) = run_engine(engine, [prompt], PARAMS)
    assert warm.num_cached_tokens == 0  # recomputed, not served from the cache
    assert_same(warm.prompt_logprobs, cold.prompt_logprobs, tol=0.0)
    plain = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    (hit,) = run_engine(engine, [prompt], plain)
    assert hit.num_cached_tokens == 20  # 5 full blocks of 4 (the last token is recomputed)


def test_n_samples_share_one_prompt_logprobs(tiny_checkpoints: dict[str, str]) -> None:
    """n=3 (forks from the parent at P - 1, paged) and n=3 without sharing (contiguous):
    one prompt_logprobs list, equal to n=1's."""
    engine = make_engine(tiny_checkpoints["llama"], block_size=4)
    prompts = random_prompts(engine.model_config.vocab_size, [13, 8], seed=7)
    expected = run_engine(engine, prompts, PARAMS)
    sampled = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=3, prompt_logprobs=K)
    for cache_mode in ("paged", "contiguous"):
        engine = make_engine(tiny_checkpoints["llama"], block_size=4, cache_mode=cache_mode)
        outputs = run_engine(engine, prompts, sampled)
        for got, want in zip(outputs, expected, strict=True):
            assert len(got.outputs) == 3
            assert_same(got.prompt_logprobs, want.prompt_logprobs)


def record_prompt_logprob_positions(engine: Engine) -> Counter[tuple[str, int]]:
    """Count how often each (request id, position) is scored, by wrapping the runner."""
    counts: Counter[tuple[str, int]] = Counter()
    execute = engine.model_runner.execute

    def counting(scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        output = execute(scheduler_output)
        for request_id, rows in output.prompt_logprobs.items():
            counts.update((request_id, rows.start + i) for i in range(len(rows.rows)))
        return output

    engine.model_runner.execute = counting  # type: ignore[method-assign]
    return counts


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(cache_mode="none"),  # every step recomputes the whole sequence
        dict(cache_mode="contiguous", max_num_batched_tokens=8),
        dict(kv_cache_dtype="int8", max_num_batched_tokens=8),
        dict(num_kv_blocks=20, max_model_len=64, max_num_batched_tokens=16),  # preemption
    ],
    ids=["none", "contiguous", "int8", "preemption"],
)
def test_each_position_is_scored_once(
    tiny_checkpoints: dict[str, str], engine_args: dict[str, Any]
) -> None:
    """Recomputing steps (cache_mode none, preemption by recompute) score every prompt
    position once; values equal the plain paged engine's (int8 KV: within its error)."""
    prompts = random_prompts(256, [20, 31, 12], seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, prompt_logprobs=K)
    expected = run_engine(make_engine(tiny_checkpoints["llama"], block_size=4), prompts, params)
    engine = make_engine(tiny_checkpoints["llama"], block_size=4, **engine_args)
    counts = record_prompt_logprob_positions(engine)
    outputs = run_engine(engine, prompts, params)
    ids = sorted({request_id for request_id, _ in counts})
    assert len(ids) == len(prompts)
    for request_id, prompt in zip(ids, prompts, strict=True):
        scored = {p: n for (r, p), n in counts.items() if r == request_id}
        assert scored == dict.fromkeys(range(len(prompt) - 1), 1)
    if "num_kv_blocks" in engine_args:
        assert engine.get_metrics().num_preemptions > 0
    int8 = engine_args.get("kv_cache_dtype") == "int8"
    for prompt, got, want in zip(prompts, outputs, expected, strict=True):
        if not int8:
            assert got.outputs[0].token_ids == want.outputs[0].token_ids
            assert_same(got.prompt_logprobs, want.prompt_logprobs)
            continue
        assert got.prompt_logprobs is not None and want.prompt_logprobs is not None
        for i in range(1, len(prompt)):
            entry_a, entry_b = got.prompt_logprobs[i], want.prompt_logprobs[i]
            assert entry_a is not None and entry_b is not None
            token = prompt[i]
            assert entry_a[token].logprob == pytest.approx(entry_b[token].logprob, abs=0.05)


@pytest.mark.slow  # compiling takes tens of seconds
def test_compiled_steps_give_the_eager_prompt_logprobs(tiny_checkpoints: dict[str, str]) -> None:
    """--compile: prefill chunks and mixed steps run through `run_hidden`, whose hidden
    states of every row feed the prompt logprobs; same values as eager."""
    engine_args: dict[str, Any] = dict(block_size=4, max_num_batched_tokens=16)
    prompts = random_prompts(256, [30, 7, 21], seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=K)
    expected = run_engine(make_engine(tiny_checkpoints["llama"], **engine_args), prompts, params)
    compiled = make_engine(
        tiny_checkpoints["llama"], compile=True, compile_sizes=(2,), **engine_args
    )
    outputs = run_engine(compiled, prompts, params)
    for got, want in zip(outputs, expected, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert_same(got.prompt_logprobs, want.prompt_logprobs, tol=1e-4)


def test_lm_head_slices_do_not_change_values(
    tiny_checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LM head runs on at most MAX_ROWS_PER_SLICE rows at a time (bounded memory); slices
    of 3 rows over two requests in one step give the values of one slice (to float
    rounding: a GEMM over fewer rows may sum in another order)."""
    import kvserve.engine.prompt_logprobs as runner_side

    engine = make_engine(tiny_checkpoints["llama"])
    prompts = random_prompts(engine.model_config.vocab_size, [40, 11], seed=10)
    expected = run_engine(engine, prompts, PARAMS)
    monkeypatch.setattr(runner_side, "MAX_ROWS_PER_SLICE", 3)
    for got, want in zip(run_engine(engine, prompts, PARAMS), expected, strict=True):
        assert_same(got.prompt_logprobs, want.prompt_logprobs)  # GEMMs of other row counts
