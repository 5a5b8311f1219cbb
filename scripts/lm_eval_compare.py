"""lm-eval through kvserve's OpenAI server against lm-eval on transformers, same weights.

Two small local tasks built from Genesis (Debian's bible-kjv; `make eval-deps`):

    kjv_cloze   multiple choice (log-likelihood): a verse's first words, then which of four
                4-word continuations is the verse's own (three come from other verses)
    kjv_next    generate_until: the verse up to a word, then the next word (greedy)

kvserve runs as `kvserve serve` on the default model and lm-eval talks to it with
`local-completions` (token-id prompts, echo + logprobs for log-likelihoods, batch prompts);
the baseline is lm-eval's `hf` model on the folder kvserve converted the GGUF into (the same
fp32 weights). lm-eval lives in its own environment, .venv-lmeval, made here on first use.

    .venv/bin/python scripts/lm_eval_compare.py --limit 200 --output-json lm_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvserve.bench.perplexity import default_text

from kvserve.bench.server_process import ServerProcess
from kvserve.default_model import resolve_default_model

ROOT = Path(__file__).resolve().parent.parent
LMEVAL_VENV = ROOT / ".venv-lmeval"
LMEVAL_PACKAGES = ["torch==2.13.0", "lm-eval[api]==0.4.13", "transformers", "accelerate"]
SERVED_NAME = "SmolLM2-135M-Instruct"

TASKS = {
    "kjv_cloze": """task: kjv_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/cloze.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "kjv_next": """task: kjv_next
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/next.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "([A-Za-z']+)"
      - function: take_first
metric_list:
  - metric: exact_match
""",
}


def verses() -> list[list[str]]:
    """Genesis as one word list per verse (verses of 12 words or more)."""
    lines = [line.strip() for line in default_text().splitlines()]
    return [line.split() for line in lines if len(line.split()) >= 12]


def write_tasks(folder: Path, seed: int = 0) -> None:
    """The two tasks' data (jsonl) and YAML under `folder`."""
    rng = random.Random(seed)
    words = verses()
    cloze, nexts = [], []
    for index, verse in enumerate(words):
        others = rng.sample([w for i, w in enumerate(words) if i != index], 3)
        options = [" ".join(verse[8:12])] + [" ".join(o[8:12]) for o in others]
        rng.shuffle(options)
        gold = options.index(" ".join(verse[8:12]))
        cloze.append({"context": " ".join(verse[:8]), "choices": options, "gold": gold})
        cut = rng.randrange(6, len(verse) - 1)
        target = re.sub(r"[^A-Za-z']", "", verse[cut])
        if target:
            nexts.append({"context": " ".join(verse[:cut]), "target": target})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in (("cloze", cloze), ("next", nexts)):
        with (folder / "data" / f"{name}.jsonl").open("w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    for task, text in TASKS.items():
        (folder / f"{task}.yaml").write_text(text.format(data=folder / "data"))


def ensure_lmeval() -> Path:
    python = LMEVAL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LMEVAL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *LMEVAL_PACKAGES], check=True)
    return python


def run_lmeval(python: Path, tasks: Path, model: str, model_args: str, args: argparse.Namespace,
               out: Path) -> dict[str, dict[str, float]]:  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "x"}
    command = [
        str(python), "-m", "lm_eval", "--model", model, "--model_args", model_args,
        "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--limit", str(args.limit),
        "--batch_size", str(args.batch_size), "--output_path", str(out), "--seed", "1234",
        "--log_samples",
        *(["--device", "cpu"] if model == "hf" else []),
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env)
    result_file = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(result_file.read_text())["results"]
    return {task: {k: v for k, v in results[task].items() if isinstance(v, float)}
            for task in TASKS}  # fmt: skip


def samples(out: Path, task: str) -> dict[int, object]:
    """doc id -> what the model answered (log-likelihoods per choice, or the generation)."""
    path = max(out.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["doc_id"]: row["filtered_resps"] for row in rows}


def agreement(work: Path) -> dict[str, float]:
    """Per-document agreement of the two runs: the largest log-likelihood difference over
    every choice of kjv_cloze, and the share of identical kjv_next generations."""
    ours, theirs = samples(work / "out-kvserve", "kjv_cloze"), samples(work / "out-hf", "kjv_cloze")
    gaps = []
    for doc, choices in ours.items():  # each choice: [log-likelihood, is_greedy]
        for a, b in zip(choices, theirs[doc], strict=True):  # type: ignore[call-overload]
            gaps.append(abs(float(a[0]) - float(b[0])))
    ours, theirs = samples(work / "out-kvserve", "kjv_next"), samples(work / "out-hf", "kjv_next")
    same = sum(ours[doc] == theirs[doc] for doc in ours) / len(ours)
    return {"cloze_max_abs_loglikelihood_diff": max(gaps), "next_same_generation": same}


def float32_hf_folder(out: Path) -> str:
    """An HF folder of the default model in float32, written by transformers from the GGUF
    (kvserve's converted folder keeps the weights as GGUF blocks, which transformers cannot
    read), with the converted folder's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvserve.default_model import default_gguf_path

    gguf_folder, gguf_name = os.path.split(default_gguf_path())
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_name)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_default_model()).save_pretrained(out)
    return str(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=200, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per request")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    python = ensure_lmeval()
    work = Path(tempfile.mkdtemp(prefix="kvserve-lmeval-"))
    folder = float32_hf_folder(work / "hf-float32")  # transformers' baseline: weights + tokenizer
    write_tasks(work / "tasks")
    report: dict[str, object] = {"limit": args.limit, "model": folder}
    server_args = ["--served-model-name", SERVED_NAME, "--max-model-len", "512"]
    with ServerProcess(server_args, work / "server.log") as server:
        base_url = f"{server.base_url}/v1/completions"
        model_args = (f"model={SERVED_NAME},base_url={base_url},tokenizer={folder},"
                      "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,"
                      f"max_retries=1,max_length=512")  # fmt: skip
        start = time.monotonic()
        report["kvserve"] = run_lmeval(python, work / "tasks", "local-completions", model_args,
                                       args, work / "out-kvserve")  # fmt: skip
        report["kvserve_seconds"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    hf_args = f"pretrained={folder},dtype=float32,max_length=512"
    report["transformers"] = run_lmeval(python, work / "tasks", "hf", hf_args, args,
                                        work / "out-hf")  # fmt: skip
    report["transformers_seconds"] = round(time.monotonic() - start, 1)
    report["agreement"] = agreement(work)
    print(json.dumps(report, indent=2))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
