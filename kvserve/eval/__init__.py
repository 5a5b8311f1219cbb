"""Accuracy evaluations through the engine: `kvserve eval ppl`.

perplexity.py  perplexity and top-1 agreement from the engine's prompt logprobs
text.py        the text to score (a file, or Genesis from Debian's bible-kjv)
cli.py         the `kvserve eval` subcommands
"""
