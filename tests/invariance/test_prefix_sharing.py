"""Prefix caching, n > 1 block sharing with copy-on-write, multi-turn reuse and metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kvserve.engine.engine import Engine
from kvserve.engine.scheduler_output import SchedulerOutput
from kvserve.sampling_params import SamplingParams
from tests.helpers import assert_no_blocks_held, make_engine, random_prompts, run_engine, token_ids

BLOCK = 16


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


def shared_prefix_prompts(vocab_size: int) -> list[list[int]]:
    """Six prompts: a 40-token system prompt, then different tails (some block-aligned)."""
    (system,) = random_prompts(vocab_size, [40], seed=7)
    tails = random_prompts(vocab_size, [3, 8, 24, 1, 9, 17], seed=8)
    return [system + tail for tail in tails]


def watch_writes(engine: Engine) -> list[int]:
    """Check, before every forward, that no scheduled token lands in a shared block.

    Returns a list that collects, per step, how many blocks are shared (ref_cnt > 1).
    """
    manager = engine.kv_cache_manager
    execute = engine.model_runner.execute
    shared_per_step: list[int] = []

    def checked_execute(scheduler_output: SchedulerOutput) -> Any:
        for entry in scheduler_output.scheduled:
            for position in range(entry.num_computed_tokens, entry.seq_len):
                block = manager.pool.blocks[entry.block_ids[position // manager.block_size]]
                assert block.ref_cnt == 1, f"{entry.request_id} writes into shared {block}"
        shared_per_step.append(sum(1 for b in manager.pool.blocks[1:] if b.ref_cnt > 1))
        return execute(scheduler_output)

    engine.model_runner.execute = checked_execute  # type: ignore[method-assign]
    return shared_per_step


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_caching_on_equals_off_on_shared_prefixes(llama: str, params: SamplingParams) -> None:
    outputs = {}
    for caching in (True, False):
        engine = make_engine(llama, block_size=BLOCK, enable_prefix_caching=caching)
        prompts = shared_prefix_prompts(engine.model_config.vocab_size)
        first = run_engine(engine, prompts[:1], params)  # warms the cache when on
        rest = run_engine(engine, prompts[1:], params)
        outputs[caching] = token_ids(first + rest)
        hits = [o.num_cached_tokens for o in rest]
        # 40 shared tokens = 2 full blocks of 16; off, nothing is ever a hit
        assert hits == ([32] * 5 if caching else [0] * 5)
    assert outputs[True] == outputs[False]


def test_metrics_count_queries_hits_and_computed_tokens(llama: str) -> None:
    engine = make_engine(llama, block_size=BLOCK)
    prompts = shared_prefix_prompts(engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    run_engine(engine, prompts[:1], params)
    run_engine(engine, prompts[1:], params)
    metrics = engine.get_metrics()
    num_prompt = sum(len(p) for p in prompts)
    assert metrics.prompt_tokens == metrics.prefix_cache_queries == num_prompt
    assert metrics.prefix_cache_hits == 5 * 32
    assert metrics.computed_prompt_tokens == num_prompt - 5 * 32
    assert metrics.generation_tokens == 6 * 4
    assert metrics.prefix_cache_hit_rate == pytest.approx(160 / num_prompt)
    assert metrics.num_kv_blocks_used == 0 and metrics.kv_cache_usage == 0.0
    assert metrics.num_kv_blocks_cached > 0
    assert metrics.num_requests_running == metrics.num_requests_waiting == 0


def test_n4_shares_the_prompt_and_equals_separate_requests(llama: str) -> None:
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    for prompt_len in (37, 32, 1):  # partial last block, block-aligned, a single token
        engine = make_engine(llama, block_size=BLOCK, enable_prefix_caching=False)
        (prompt,) = random_prompts(engine.model_config.vocab_size, [prompt_len], seed=prompt_len)
        shared_per_step = watch_writes(engine)
        (together,) = run_engine(engine, [prompt], params)
        # the prompt ran once: the parent's P - 1 tokens, then each sample its last token
        assert engine.get_metrics().computed_prompt_tokens == prompt_len - 1 + 4
        if prompt_len > BLOCK:
            assert max(shared_per_step) >= (prompt_len - 1) // BLOCK
        separate = make_engine(llama, block_size=BLOCK, enable_prefix_caching=False)
        alone = run_engine(separate, [prompt] * 4, [params.for_child(i) for i in range(4)])
        assert [c.token_ids for c in together.outputs] == token_ids(alone)


def test_n_larger_than_max_num_seqs_runs_unshared(llama: str) -> None:
    engine = make_engine(llama, block_size=BLOCK, max_num_seqs=2)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    (prompt,) = random_prompts(engine.model_config.vocab_size, [20], seed=2)
    (output,) = run_engine(engine, [prompt], params)
    separate = make_engine(llama, block_size=BLOCK)
    alone = run_engine(separate, [prompt] * 3, [params.for_child(i) for i in range(3)])
    assert [c.token_ids for c in output.outputs] == token_ids(alone)


def test_abort_before_the_fork_frees_every_sample(llama: str) -> None:
    engine = make_engine(llama, block_size=BLOCK, max_num_batched_tokens=8)
    (prompt,) = random_prompts(engine.model_config.vocab_size, [40], seed=4)
    engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(n=3, max_tokens=5))
    engine.step()  # 8 of 39 prefill tokens: the samples have not forked yet
    engine.scheduler.check_invariants()
    assert engine.get_metrics().num_requests_running == 1
    engine.abort_request("r")
    engine.scheduler.check_invariants()
    assert not engine.has_unfinished_requests()
    assert_no_blocks_held(engine)


def test_preemption_with_forked_samples_keeps_outputs(llama: str) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=40, ignore_eos=True)
    prompts = random_prompts(256, [30, 21], seed=6)
    roomy = run_engine(make_engine(llama, block_size=4), prompts, params)
    tight = make_engine(llama, block_size=4, num_kv_blocks=40, max_model_len=72)
    squeezed = run_engine(tight, prompts, params)
    assert tight.get_metrics().num_preemptions > 0
    for a, b in zip(roomy, squeezed, strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def chat_turns(
    engine: Engine, chat: Callable[[list[int]], list[int]], num_turns: int
) -> tuple[list[list[int]], list[int]]:
    """A conversation whose prompt is all earlier turns (prompt and reply) plus a new message."""
    history: list[int] = []
    replies, cached = [], []
    for turn in range(num_turns):
        (message,) = random_prompts(engine.model_config.vocab_size, [5 + 3 * turn], seed=turn)
        history = history + message
        reply = chat(history)
        cached.append(engine.get_metrics().prefix_cache_hits)
        replies.append(reply)
        history = history + reply
    return replies, cached


def test_multi_turn_reuses_earlier_turns_and_matches_no_caching(llama: str) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    results = {}
    for caching in (True, False):
        engine = make_engine(llama, block_size=4, enable_prefix_caching=caching)
        outputs: list[Any] = []

        def chat(prompt: list[int], engine: Engine = engine, out: list[Any] = outputs) -> list[int]:
            (output,) = run_engine(engine, [prompt], params)
            out.append(output)
            return output.outputs[0].token_ids

        replies, _ = chat_turns(engine, chat, 5)
        results[caching] = replies
        if caching:
            prompt_lens = [len(o.prompt_token_ids) for o in outputs]
            for turn in range(1, 5):
                # everything of the previous turn, prompt and reply but its last (never
                # computed) token, is reused, rounded down to whole blocks of 4
                reusable = prompt_lens[turn - 1] + params.max_tokens - 1
                assert outputs[turn].num_cached_tokens == reusable // 4 * 4
    assert results[True] == results[False]


def test_cache_salt_keeps_tenants_apart(tiny_checkpoints: dict[str, str]) -> None:
    from kvserve.llm import LLM

    llm = LLM(tiny_checkpoints["llama"], num_kv_blocks=64, max_model_len=128)
    (prompt,) = random_prompts(256, [40], seed=12)
    params = SamplingParams(temperature=0.0, max_tokens=3)

    def cached(salt: str | None) -> int:
        request: dict[str, Any] = {"prompt_token_ids": prompt}
        if salt is not None:
            request["cache_salt"] = salt
        (output,) = llm.generate(request, params, use_tqdm=False)
        return output.num_cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0  # same tokens, other tenant: no hit
    assert cached(None) == 0
    assert cached("tenant-a") == 32  # its own blocks: 2 full blocks of 16
    with pytest.raises(ValueError, match="cache_salt"):
        llm.generate({"prompt_token_ids": prompt, "cache_salt": 5}, params, use_tqdm=False)
    assert llm.get_metrics().num_kv_blocks_used == 0


def test_every_entry_point_honours_cache_salt(tiny_checkpoints: dict[str, str]) -> None:
    """generate, generate_stream and the server's AsyncEngine hand the dict prompt to the
    engine, which reads the salt: another salt shares no block, the same salt does."""
    import asyncio

    from kvserve.llm import LLM
    from kvserve.server.async_engine import AsyncEngine

    llm = LLM(tiny_checkpoints["llama"], num_kv_blocks=64, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=2)

    def via_generate(prompt: dict[str, Any]) -> int:
        return llm.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens

    def via_stream(prompt: dict[str, Any]) -> int:
        return list(llm.generate_stream(prompt, params))[-1].num_cached_tokens

    async def stream_async(engine: AsyncEngine, prompt: dict[str, Any]) -> int:
        outputs = [o async for o in engine.generate(f"a{id(prompt)}", prompt, params)]
        return outputs[-1].num_cached_tokens

    async_engine = AsyncEngine(llm.engine)

    def via_async(prompt: dict[str, Any]) -> int:
        return asyncio.run(stream_async(async_engine, prompt))

    try:
        for seed, run in enumerate((via_generate, via_stream, via_async)):
            (ids,) = random_prompts(256, [40], seed=20 + seed)  # fresh tokens per entry point
            assert run({"prompt_token_ids": ids, "cache_salt": "a"}) == 0
            assert run({"prompt_token_ids": ids, "cache_salt": "b"}) == 0  # no shared block
            assert run({"prompt_token_ids": ids}) == 0
            assert run({"prompt_token_ids": ids, "cache_salt": "a"}) == 32, run.__name__
            with pytest.raises(ValueError, match="^cache_salt:"):
                run({"prompt_token_ids": ids, "cache_salt": ""})
    finally:
        async_engine.shutdown()
    assert llm.get_metrics().num_kv_blocks_used == 0
