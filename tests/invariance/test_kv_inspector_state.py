"""The KV inspector's copy of the cache (engine/kv_state.py, server/inspector/) equals the
engine's own structures after every step of a scripted run: a shared prefix, an `n=2`
request, preemptions and an abort; the JSON built from it counts what the pool counts, and
the engine's invariants hold throughout."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from kvserve.engine.engine import Engine
from kvserve.sampling_params import SamplingParams
from kvserve.server.inspector import publisher
from kvserve.server.inspector.publisher import KVInspector
from kvserve.server.inspector.state_json import block_json, state_json
from tests.helpers import assert_no_blocks_held, make_engine, random_prompts

BLOCK = 4


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


def _copy(engine: Engine, inspector: KVInspector, step: int) -> Any:
    inspector.view()  # a page is watching
    inspector.update(engine, step, changed=True)
    assert inspector.state is not None and inspector.state.step == step
    return inspector.state


def _check(engine: Engine, inspector: KVInspector, step: int) -> dict[str, Any]:
    """The copy against the engine; returns its JSON."""
    engine.scheduler.check_invariants()
    state = _copy(engine, inspector, step)
    pool, manager, scheduler = (
        engine.kv_cache_manager.pool,
        engine.kv_cache_manager,
        engine.scheduler,
    )
    assert state.ref_counts == tuple(b.ref_cnt for b in pool.blocks)
    assert state.block_hashes == tuple(b.block_hash for b in pool.blocks)
    assert {r.request_id for r in state.requests} == set(scheduler.requests)
    running = [r.request_id for r in scheduler.running]
    assert [r.request_id for r in state.requests[: len(running)]] == running
    held: Counter[int] = Counter()
    for r in state.requests:
        request = scheduler.requests[r.request_id]
        assert list(r.block_ids) == manager.get_block_ids(r.request_id)
        assert r.status == request.status.name.lower()
        assert (r.num_computed_tokens, r.num_preemptions) == (
            request.num_computed_tokens, request.num_preemptions,
        )  # fmt: skip
        assert r.token_ids == tuple(request.all_token_ids)
        held.update(b for b in r.block_ids if b)
    # the copy is consistent with itself: a block's ref count is the tables holding it
    assert all(state.ref_counts[b] == n for b, n in held.items())
    assert all(state.ref_counts[b] == 0 for b in range(1, len(state.ref_counts)) if b not in held)
    body = state_json(inspector, state)
    counts = body["pool"]
    assert counts["num_free"] + counts["num_cached"] == pool.num_free_blocks
    assert counts["num_used"] + counts["num_shared"] == manager.num_used_blocks
    assert counts["num_shared"] == sum(1 for n in held.values() if n > 1)
    assert body["pool"]["states"][0] == "null"
    for block_id, owners in ((b, n) for b, n in held.items() if n > 1):
        detail = block_json(inspector, state, block_id, engine.tokenizer)
        assert detail["state"] == "shared" and len(detail["owners"]) == owners
        first = scheduler.requests[detail["owners"][0]["request_id"]]
        index = detail["owners"][0]["index"]
        end = min((index + 1) * BLOCK, first.num_computed_tokens)
        assert detail["token_ids"] == first.all_token_ids[index * BLOCK : end]
    return body


def test_the_copy_matches_the_engine_through_sharing_forks_preemption_and_abort(
    llama: str,
) -> None:
    engine = make_engine(llama, num_kv_blocks=24, block_size=BLOCK, max_model_len=64)
    inspector = KVInspector(show_text=True, interval_s=0.0, copy_budget=1.0)
    vocab = engine.model_config.vocab_size
    prefix, tail_a, tail_b, prompt_c = random_prompts(vocab, [16, 8, 6, 10], seed=3)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine.add_request("A", {"prompt_token_ids": prefix + tail_a}, long)
    seen: Counter[str] = Counter()
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        step += 1
        body = _check(engine, inspector, step)
        if step == 2:  # A's prefix blocks are cached: B hits them
            engine.add_request("B", {"prompt_token_ids": prefix + tail_b}, long)
        if step == 3:
            two = SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=30, ignore_eos=True)
            engine.add_request("C", {"prompt_token_ids": prompt_c}, two)
        requests = {r["id"]: r for r in body["requests"]}
        seen["shared"] += body["pool"]["num_shared"] > 0
        seen["hit"] += requests.get("B", {}).get("num_cached_tokens", 0) == 16
        seen["forked"] += "C#0" in requests and "C#1" in requests
        if any(r["num_preemptions"] for r in requests.values()):
            seen["preempted"] += 1
            if "C#0" in requests and not seen["aborted"]:
                engine.abort_request("C")
                seen["aborted"] += 1
                after = _check(engine, inspector, step)
                assert not any(r["id"].startswith("C#") for r in after["requests"])
    for what in ("shared", "hit", "forked", "preempted", "aborted"):
        assert seen[what], f"the script never showed {what}"
    final = _check(engine, inspector, step + 1)
    assert final["requests"] == [] and final["pool"]["num_used"] == 0
    assert_no_blocks_held(engine)


def test_nothing_is_copied_while_no_page_watches_and_text_only_when_asked(llama: str) -> None:
    engine = make_engine(llama, num_kv_blocks=24, block_size=BLOCK, max_model_len=64)
    inspector = KVInspector(interval_s=0.0, copy_budget=1.0)
    inspector.update(engine, 0, changed=True)
    assert inspector.state is None  # nobody viewed it
    engine.add_request("A", {"prompt_token_ids": list(range(3, 20))}, SamplingParams(max_tokens=4))
    engine.step()
    state = _copy(engine, inspector, 1)
    assert all(r.token_ids is None for r in state.requests)
    block = state.requests[0].block_ids[0]
    detail = block_json(inspector, state, block, engine.tokenizer)
    assert detail["owners"] == [{"request_id": "A", "index": 0}]
    assert detail["token_ids"] is None and detail["text"] is None


def test_copies_take_at_most_their_budget_of_the_engines_time(
    llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that took 2 ms on a 1% budget: the next one no sooner than 0.2 s later."""
    clock = iter([100.0, 100.002, 100.1, 100.19, 100.21, 100.211])
    monkeypatch.setattr(publisher, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    engine = make_engine(llama, num_kv_blocks=24, block_size=BLOCK, max_model_len=64)
    inspector = KVInspector(interval_s=0.05, copy_budget=0.01)
    inspector._watched_until = float("inf")  # watched throughout
    inspector.update(engine, 1, changed=True)  # 100.0: a copy, ends at 100.002
    first = inspector.state
    assert first is not None
    inspector.update(engine, 2, changed=True)  # 100.1: past interval_s, not past the budget
    inspector.update(engine, 3, changed=True)  # 100.19
    assert inspector.state is first
    inspector.update(engine, 4, changed=True)  # 100.21: a copy
    assert inspector.state is not first and inspector.state.step == 4
