"""A small real tokenizer for the tiny checkpoints (which ship none): byte-level BPE.

The 256 byte symbols, an end-of-sequence token (id 0) and a few merges learned from a JSON-ish
corpus, about 300 tokens; a checkpoint that uses it needs `vocab_size` >= TINY_TOKENIZER_SIZE
(a larger one leaves model ids without text, which a grammar never allows).
"""

from __future__ import annotations

from pathlib import Path

TINY_TOKENIZER_SIZE = 300
EOS_TOKEN_ID = 0
_CORPUS = [
    '{"name": "alice", "age": 30, "pet": {"kind": "cat", "vaccinated": true}}',
    '{"color": "green", "size": 2, "tags": ["a", "b"], "ok": false, "n": null}',
    "the quick brown fox jumps over the lazy dog, 0123456789",
]


def save_tiny_tokenizer(folder: Path, chat_template: str | None = None) -> None:
    """Train the tokenizer (deterministic) and save it into `folder` as a fast HF tokenizer,
    with `chat_template` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_TOKENIZER_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 10, trainer)
    assert tokenizer.get_vocab_size() == TINY_TOKENIZER_SIZE
    assert tokenizer.token_to_id("<eos>") == EOS_TOKEN_ID
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", chat_template=chat_template
    )
    fast.save_pretrained(folder)
