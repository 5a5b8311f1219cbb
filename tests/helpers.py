"""Shared test helpers: run the engine step by step with invariant checks, an HF oracle."""

from __future__ import annotations

import random

import torch

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams


def decode_kernel_expected() -> bool:
    """Whether kvserve's C++ decode attention must build here: x86 with AVX2 or AVX-512, the
    CPUs this project runs on (elsewhere attention stays in torch)."""
    import platform

    capability = torch.backends.cpu.get_cpu_capability()
    return platform.machine() in ("x86_64", "AMD64") and capability in ("AVX2", "AVX512")


def make_engine(model: str, **engine_args: object) -> Engine:
    engine_args.setdefault("num_kv_blocks", 256)
    engine_args.setdefault("max_model_len", 128)
    return Engine(EngineConfig(model=model, **engine_args))  # type: ignore[arg-type]


def run_engine(
    engine: Engine,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    check: bool = True,
) -> list[RequestOutput]:
    """Queue every prompt, step to completion checking invariants after every step."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    base = len(engine.output_processor._parents) + random.randrange(1 << 30)
    ids = [f"r{base}-{i}" for i in range(len(prompts))]
    for request_id, prompt, p in zip(ids, prompts, params_list, strict=True):
        engine.add_request(request_id, {"prompt_token_ids": prompt}, p)
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        if check:
            engine.scheduler.check_invariants()
    assert_no_blocks_held(engine)
    return [finished[request_id] for request_id in ids]


def assert_no_blocks_held(engine: Engine) -> None:
    manager = engine.kv_cache_manager
    manager.check_invariants()
    assert manager.num_used_blocks == 0, f"{manager.num_used_blocks} KV blocks still held"


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def token_ids(outputs: list[RequestOutput]) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


@torch.inference_mode()
def hf_greedy(
    hf_model: torch.nn.Module, prompt: list[int], num_new: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step log-softmax rows from transformers, recomputing the full
    sequence each step (the oracle: no cache, no generate() heuristics, EOS ignored)."""
    ids = list(prompt)
    logprob_rows = []
    for _ in range(num_new):
        logits = hf_model(torch.tensor([ids])).logits[0, -1].float()  # (vocab,)
        logprob_rows.append(torch.log_softmax(logits, dim=-1))
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :], logprob_rows
