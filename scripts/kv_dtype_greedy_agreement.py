"""Free-running greedy agreement of each KV dtype with `auto` on the default model.

    .venv/bin/python scripts/kv_dtype_greedy_agreement.py [--dtypes int8,fp8_e4m3,int4]

Generates 48 greedy tokens for 8 English prompts with each dtype and prints, per dtype, the
share of generated tokens before each sequence's first difference from `auto`, and where each
sequence first differs (48 = never).
"""

from __future__ import annotations

import argparse

from kvserve import LLM, SamplingParams

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The KV cache stores",
    "Water boils at",
    "In 1905, Albert Einstein",
    "The best way to learn a language is",
    "Photosynthesis is the process",
]


def first_difference(ref: list[int], got: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), len(ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtypes", default="int8,fp8_e4m3,int4")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    runs: dict[str, list[list[int]]] = {}
    for dtype in ["auto", *args.dtypes.split(",")]:
        llm = LLM(kv_cache_dtype=dtype, num_threads=2)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        runs[dtype] = [list(o.outputs[0].token_ids) for o in outputs]
        del llm
    total = sum(len(r) for r in runs["auto"])
    for dtype in args.dtypes.split(","):
        firsts = [first_difference(r, g) for r, g in zip(runs["auto"], runs[dtype], strict=True)]
        print(f"{dtype}: agreement {sum(firsts) / total:.3f}, first differences {firsts}")


if __name__ == "__main__":
    main()
