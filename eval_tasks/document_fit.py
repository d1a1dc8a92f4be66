"""The check that every document of a multiple-choice task fits the model: lm-eval scores each choice
on context + " " + choice, read as one sequence, and would cut the start of one longer than the
model's ``max_length`` (and with it the keys or sets a document is about)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .recall import Tokenizer, model_max_length, token_counter


def check_choices_fit(
    docs: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any],
    tokenizer: Tokenizer | None,
    too_long: Callable[[Mapping[str, Any], int, int], str],
) -> None:
    """A ValueError with ``too_long(doc, tokens, max_length)`` for the first document whose longest
    context + choice exceeds the model's max_length; nothing is checked when it is unknown."""
    limit = model_max_length(metadata, tokenizer)
    if limit is None:
        return
    count = token_counter(metadata, tokenizer)
    for doc in docs:
        tokens = max(count(f"{doc['context']} {choice}") for choice in doc["choices"])
        if tokens > limit:
            raise ValueError(too_long(doc, tokens, limit))
