"""Turn a request's output tokens into text as they arrive, and find stop strings.

Byte-level BPE spreads one character over several tokens (an emoji is 4 bytes), so text is
released only once it is valid UTF-8: a delta never holds half a character. Fast (Rust)
tokenizers decode with `tokenizers.decoders.DecodeStream`; any other tokenizer with vLLM's
prefix/read-offset algorithm over `decode`. Both are primed with the end of the prompt, as in
vLLM, so a first token's leading space (SentencePiece "▁") is kept.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from kvserve.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens used as decoding context (the first suffix of >= 4 without a broken char).
_MIN_CONTEXT_TOKENS = 4
_MAX_CONTEXT_TOKENS = 24


class IncrementalDetokenizer:
    """Text of one request's output, with stop-string detection and safe streaming deltas.

        text:  [ sent by get_delta | not sent yet | held back: may start a stop string ]
               0              num_sent             len(text) - (max stop length - 1)

    With `tokenizer=None` (a model without tokenizer files) the text stays empty and stop
    strings never match; generation is driven by token ids alone.
    """

    def __init__(
        self, tokenizer: Any | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.token_ids: list[int] = []
        self.stop = list(params.stop)
        self.stop_reason: str | None = None
        # Characters get_delta holds back while unfinished, so no stop string leaks partially.
        self._num_held = max((len(s) for s in self.stop), default=1) - 1
        self._text = ""
        self._num_sent = 0
        self._stream: _FastStream | _OffsetStream | None = None
        if tokenizer is not None:
            context = _prompt_context(tokenizer, prompt_token_ids)
            skip = params.skip_special_tokens
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None:
                self._stream = _FastStream(backend, context, skip)
            else:
                self._stream = _OffsetStream(tokenizer, context, skip)

    @property
    def output_text(self) -> str:
        """All text decoded so far (whole characters only; cut before a stop string)."""
        return self._text

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append output tokens and decode them.

        Returns:
            The stop string if one now appears in the text, else None. The text is then
            truncated before it (the stop string excluded) and later tokens are ignored.
        """
        self.token_ids.extend(new_token_ids)
        if self._stream is None or self.stop_reason is not None:
            return None
        num_old_chars = len(self._text)
        self._text += "".join(self._stream.step(t) for t in new_token_ids)
        if self.stop:
            self._check_stop(start=max(0, num_old_chars - self._num_held))
        return self.stop_reason

    def get_delta(self, finished: bool) -> str:
        """Text not returned by earlier calls.

        While unfinished, the last (max stop string length - 1) characters are held back.
        With `finished`, everything is returned, including the replacement characters of
        trailing bytes that never formed a whole character (as `tokenizer.decode` shows them).
        """
        if finished and self._stream is not None and self.stop_reason is None:
            self._text += self._stream.flush()
        end = len(self._text)
        if not finished and self.stop_reason is None:
            end = max(self._num_sent, end - self._num_held)
        delta = self._text[self._num_sent : end]
        self._num_sent = end
        return delta

    def _check_stop(self, start: int) -> None:
        """Cut the text at the earliest stop string found at or after `start`."""
        found = [(self._text.find(s, start), s) for s in self.stop]
        hits = [(index, s) for index, s in found if index >= 0]
        if hits:
            index, stop = min(hits, key=lambda hit: hit[0])
            self._text = self._text[:index]
            self.stop_reason = stop


class _FastStream:
    """`tokenizers.decoders.DecodeStream` over a Rust tokenizer."""

    def __init__(self, backend: Any, context: list[int], skip_special_tokens: bool) -> None:
        self._backend = backend
        self._skip = skip_special_tokens
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._pending: list[int] = []  # tokens whose text is not released yet

    def step(self, token_id: int) -> str:
        self._pending.append(token_id)
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception as error:  # tokenizers raises a bare Exception
            if "Invalid prefix" not in str(error):
                raise
            # The context decodes differently once extended (as vLLM does: restart).
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            text = self._stream.step(self._backend, token_id)
        if text is None:
            return ""
        self._pending = []
        return str(text)

    def flush(self) -> str:
        """Text of the tokens still held (bytes of an unfinished character)."""
        text = self._backend.decode(self._pending, skip_special_tokens=self._skip)
        self._pending = []
        return str(text)


class _OffsetStream:
    """vLLM's prefix/read-offset algorithm over any tokenizer's `decode`.

    ids: [ ... | prefix_offset .. read_offset | read_offset .. end ]
                 already released (context)   not released yet
    """

    def __init__(self, tokenizer: Any, context: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip))


def _prompt_context(tokenizer: Any, prompt_token_ids: list[int]) -> list[int]:
    """The shortest prompt suffix of 4 to 24 tokens that decodes without a broken character.

    A prompt that ends inside a character gets no context: the output text then starts at
    the first whole character of the output, never inside one begun by the prompt.
    """
    if len(prompt_token_ids) < _MIN_CONTEXT_TOKENS:
        candidates = [list(prompt_token_ids)]
    else:
        longest = min(len(prompt_token_ids), _MAX_CONTEXT_TOKENS)
        candidates = [prompt_token_ids[-n:] for n in range(_MIN_CONTEXT_TOKENS, longest + 1)]
    for suffix in candidates:
        if _REPLACEMENT_CHAR not in tokenizer.decode(suffix):
            return list(suffix)
    return []
