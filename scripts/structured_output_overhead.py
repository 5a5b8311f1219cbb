"""What a JSON schema costs per decoded token, on the default model (or --model).

    .venv/bin/python scripts/structured_output_overhead.py [--num-threads 2]

One chat prompt asks for a person as JSON. The constrained run (greedy, a schema with a nested
object, an enum, an integer and strings) ends when the grammar does, after N tokens; the free
run decodes exactly N tokens from the same prompt (`min_tokens = max_tokens = N`,
`ignore_eos`). Both run in this process after one untimed warm-up each (which also builds the
llguidance tokenizer, timed apart), then one timed run each. Decode tok/s counts tokens 2..N
over the steps after the first (prefill) step. The mask alone replays the N tokens through a
fresh matcher: filling the bitmask and consuming the token (llguidance), and applying the mask
to a row of logits (kvserve's sampler).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvserve import LLM, SamplingParams
from kvserve.engine.engine import Engine
from kvserve.engine.logits_processors import apply_token_bitmask
from kvserve.engine.scheduler_output import ScheduledRequest
from kvserve.request import Request
from kvserve.sampling_params import StructuredOutputParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "job": {"type": "string", "maxLength": 40},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "city": {"type": "string", "maxLength": 40},
                "kind": {"enum": ["home", "work"]},
            },
            "required": ["street", "city", "kind"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "job", "address"],
    "additionalProperties": False,
}
MESSAGE = (
    "Describe a fictional person as a JSON object with name, age, job and address "
    "(street, city, and kind: home or work)."
)


def timed_run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
    """Output token ids and the seconds of every step after the first (decode steps)."""
    engine.add_request("bench", {"prompt_token_ids": prompt}, params)
    engine.step()
    start = time.perf_counter()
    token_ids: list[int] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            token_ids = output.outputs[0].token_ids
    return token_ids, time.perf_counter() - start


def mask_cost(engine: Engine, prompt: list[int], token_ids: list[int]) -> dict[str, float]:
    """Milliseconds per token to fill + consume (llguidance) and to apply the mask (torch):
    mean and median over the tokens (the median shrugs off the scheduler's hiccups)."""
    params = SamplingParams(structured_output=StructuredOutputParams(json=SCHEMA))
    manager = engine.structured_output
    manager.add_requests([Request("replay", prompt, params)])
    entry = ScheduledRequest("replay", [0], 0, [], True, params, prompt, [], frozenset())
    logits = torch.randn(1, engine.model_config.vocab_size)  # (1, vocab)
    fill: list[float] = []
    apply: list[float] = []
    for token_id in token_ids:
        t0 = time.perf_counter()
        bitmask = manager.grammar_bitmask([entry])
        manager.accept_token("replay", token_id)
        t1 = time.perf_counter()
        apply_token_bitmask(logits.clone(), [entry], bitmask)
        t2 = time.perf_counter()
        fill.append(1e3 * (t1 - t0))
        apply.append(1e3 * (t2 - t1))
    manager.free("replay")
    return {
        "fill_consume_ms": statistics.mean(fill),
        "fill_consume_median_ms": statistics.median(fill),
        "apply_ms": statistics.mean(apply),
        "apply_median_ms": statistics.median(apply),
    }


def compare(engine: Engine, prompt: list[int], repeats: int) -> tuple[list[int], float]:
    """The constrained output and the median json / free decode tok/s ratio (interleaved)."""
    constrained = SamplingParams(
        temperature=0.0, max_tokens=400, structured_output=StructuredOutputParams(json=SCHEMA)
    )
    warm, _ = timed_run(engine, prompt, constrained)
    num = len(warm)
    free = SamplingParams(temperature=0.0, max_tokens=num, min_tokens=num, ignore_eos=True)
    timed_run(engine, prompt, free)
    ratios = []
    for _ in range(repeats):
        free_ids, free_s = timed_run(engine, prompt, free)
        json_ids, json_s = timed_run(engine, prompt, constrained)
        assert json_ids == warm and len(free_ids) == num
        free_tps, json_tps = (num - 1) / free_s, (num - 1) / json_s
        ratios.append(json_tps / free_tps)
        print(f"decode tok/s  free {free_tps:.1f}  json schema {json_tps:.1f}")
    return warm, statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(args.model, num_threads=args.num_threads)
    engine = llm.engine
    prompt = llm.chat_prompt([{"role": "user", "content": MESSAGE}])["prompt_token_ids"]
    start = time.perf_counter()
    engine.structured_output.check(StructuredOutputParams(json=SCHEMA))
    print(f"llguidance tokenizer build (once per engine): {time.perf_counter() - start:.3f} s")
    token_ids, ratio = compare(engine, prompt, args.repeats)
    text = engine.tokenizer.decode(token_ids)
    json.loads(text)  # raises if the output were not JSON
    print(f"output ({len(token_ids)} tokens): {text}")
    print(f"json / free decode tok/s, median of {args.repeats} interleaved pairs: {ratio:.3f}")
    cost = mask_cost(engine, prompt, token_ids)
    print(f"mask per token, mean (median): fill+consume {cost['fill_consume_ms']:.3f} "
          f"({cost['fill_consume_median_ms']:.3f}) ms, apply {cost['apply_ms']:.3f} "
          f"({cost['apply_median_ms']:.3f}) ms")  # fmt: skip


if __name__ == "__main__":
    main()
