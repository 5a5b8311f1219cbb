"""Our models against transformers (eager attention, float32) on tiny random checkpoints.

(a) A batch of prompts flattened into one step without a cache.
(b) The same prompts through a paged cache: chunked prefill on shuffled blocks, then decode
    steps batched together; every computed row is checked against transformers' logits of
    the full sequence at that position.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from kvserve.kv.quant import LayerKV
from kvserve.model.attention import AttentionMetadata
from kvserve.model.layers import CausalLM
from kvserve.model.loader import load_model

# The names of conftest.TINY_CHECKPOINTS (checked by test_checkpoint_names).
CHECKPOINT_NAMES = (
    "gpt2",
    "llama",
    "llama_head_dim",
    "llama_mqa",
    "llama_tied",
    "mistral",
    "qwen2",
    "qwen2_swa",
)
ATOL = 1e-4
PROMPT_LENS = (5, 11, 17)  # the longest exceeds the sliding window (8) of mistral / qwen2_swa
NUM_DECODE_STEPS = 8


@functools.cache
def _models(path: Path) -> tuple[CausalLM, Any]:
    from transformers import AutoModelForCausalLM

    ours = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return ours, hf


def _sequences(vocab_size: int) -> list[Tensor]:
    """Prompt + the tokens fed in decode steps, each (prompt_len + NUM_DECODE_STEPS,)."""
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, vocab_size, (n + NUM_DECODE_STEPS,), generator=generator)
        for n in PROMPT_LENS
    ]


@torch.inference_mode()
def _hf_logits(hf: Any, tokens: Tensor) -> Tensor:
    return hf(tokens.unsqueeze(0)).logits[0].float()  # (len, vocab)


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
@torch.inference_mode()
def test_batch_without_cache_matches_transformers(name: str, tiny_checkpoints: dict) -> None:
    ours, hf = _models(tiny_checkpoints[name])
    prompts = [s[:n] for s, n in zip(_sequences(ours.config.vocab_size), PROMPT_LENS, strict=True)]
    md = AttentionMetadata(
        query_start_loc=[0, 5, 16, 33],
        seq_lens=list(PROMPT_LENS),
        num_decodes=0,
        slot_mapping=None,
        block_tables=None,
        block_size=4,
    )
    input_ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(n) for n in PROMPT_LENS])
    logits = ours.compute_logits(ours(input_ids, positions, md, None))
    expected = torch.cat([_hf_logits(hf, p) for p in prompts])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)


class PagedDriver:
    """A minimal model runner: chunked prefill, then one token a step, decodes first.

    Blocks come from a shuffled pool. With `drop_out_of_window`, blocks entirely before the
    sliding window of a step's first query point at a block of huge values instead, as if
    the cache manager had freed and reused them: the mask must hide them.
    """

    POISON_BLOCK = 0  # never allocated; holds huge finite values, stands for a freed block

    def __init__(self, model: CausalLM, kv_dtype: torch.dtype, drop_out_of_window: bool) -> None:
        cfg = model.config
        self.model, self.block_size, num_blocks = model, 4, 40
        self.window = cfg.sliding_window if drop_out_of_window else None
        shape = (num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = []
        for _ in range(cfg.num_hidden_layers):
            k_cache, v_cache = (
                torch.zeros(shape, dtype=kv_dtype),
                torch.zeros(shape, dtype=kv_dtype),
            )
            k_cache[self.POISON_BLOCK], v_cache[self.POISON_BLOCK] = 1e4, 1e4
            self.kv_caches.append(LayerKV(k_cache, v_cache))
        shuffled = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(1)) + 1
        self.free_blocks = shuffled.tolist()

    def step(self, seqs: list[dict], chunks: list[int]) -> Tensor:
        """Run `chunks[i]` new tokens of each `seqs[i]` (decodes first) -> (num_tokens, vocab)."""
        bs = self.block_size
        input_ids, positions, slots, tables, seq_lens = [], [], [], [], []
        for seq, n in zip(seqs, chunks, strict=True):
            start, end = seq["num_computed"], seq["num_computed"] + n
            while len(seq["block_ids"]) * bs < end:
                seq["block_ids"].append(self.free_blocks.pop())
            input_ids += seq["tokens"][start:end].tolist()
            positions += range(start, end)
            slots += [seq["block_ids"][p // bs] * bs + p % bs for p in range(start, end)]
            # block j is out of every query's window when its last key (j + 1) * bs - 1 is
            # at or before start - window
            tables.append(
                [
                    self.POISON_BLOCK
                    if self.window is not None and (j + 1) * bs - 1 <= start - self.window
                    else block_id
                    for j, block_id in enumerate(seq["block_ids"])
                ]
            )
            seq_lens.append(end)
            seq["num_computed"] = end
        width = max(len(t) for t in tables)
        md = AttentionMetadata(
            query_start_loc=[0, *torch.tensor(chunks).cumsum(0).tolist()],
            seq_lens=seq_lens,
            num_decodes=sum(1 for n in chunks if n == 1),
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
            block_size=bs,
        )
        hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), md, self.kv_caches)
        return self.model.compute_logits(hidden)


def _run_paged(
    ours: CausalLM, hf: Any, kv_dtype: torch.dtype, atol: float, chunk: int = 3
) -> list[int]:
    """Drive all sequences to the end, comparing every row; returns num_decodes per step."""
    driver = PagedDriver(ours, kv_dtype, drop_out_of_window=True)
    sequences = _sequences(ours.config.vocab_size)
    seqs = [
        {"tokens": s, "prompt_len": n, "num_computed": 0, "block_ids": [], "hf": _hf_logits(hf, s)}
        for s, n in zip(sequences, PROMPT_LENS, strict=True)
    ]
    decodes_per_step = []
    while any(s["num_computed"] < len(s["tokens"]) for s in seqs):
        active = [s for s in seqs if s["num_computed"] < len(s["tokens"])]
        decoding = [s for s in active if s["num_computed"] >= s["prompt_len"]]
        prefilling = [s for s in active if s["num_computed"] < s["prompt_len"]]
        chunks = [1] * len(decoding)
        chunks += [min(chunk, s["prompt_len"] - s["num_computed"]) for s in prefilling]
        starts = [s["num_computed"] for s in decoding + prefilling]
        logits = driver.step(decoding + prefilling, chunks)
        row = 0
        for s, start, n in zip(decoding + prefilling, starts, chunks, strict=True):
            want = s["hf"][start : start + n]
            torch.testing.assert_close(logits[row : row + n], want, rtol=0, atol=atol)
            row += n
        decodes_per_step.append(len(decoding))
    return decodes_per_step


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
@torch.inference_mode()
def test_paged_chunked_prefill_and_decode_match_transformers(
    name: str, tiny_checkpoints: dict
) -> None:
    ours, hf = _models(tiny_checkpoints[name])
    decodes_per_step = _run_paged(ours, hf, torch.float32, ATOL)
    assert max(decodes_per_step) == len(PROMPT_LENS)  # all seqs decoded in one batch
    assert 0 < decodes_per_step[3] < len(PROMPT_LENS)  # a step mixed decodes and prefill


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
@torch.inference_mode()
def test_float16_cache_stays_close(name: str, tiny_checkpoints: dict) -> None:
    ours, hf = _models(tiny_checkpoints[name])
    _run_paged(ours, hf, torch.float16, atol=2e-2)


@torch.inference_mode()
def test_whole_prompt_in_one_chunk_equals_chunked(tiny_checkpoints: dict) -> None:
    ours, hf = _models(tiny_checkpoints["mistral"])
    _run_paged(ours, hf, torch.float32, ATOL, chunk=100)


def test_checkpoint_names(tiny_checkpoints: dict) -> None:
    assert sorted(tiny_checkpoints) == list(CHECKPOINT_NAMES)
