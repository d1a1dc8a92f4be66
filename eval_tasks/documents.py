"""Building a task's documents in code, shared by the generated task families (``recall``,
``set_disjointness``): their symbols, an RNG per document, the test split lm-eval reads, the check
that every choice fits the model, and per-length exact-match scoring."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .tokens import Tokenizer, model_max_length, token_counter

if TYPE_CHECKING:
    import datasets

# two-letter words (a few tokens in any tokenizer) in two disjoint halves: keys from the first half of
# the alphabet, values from the second (Zoology's vocabulary split in two)
KEY_SYMBOLS = tuple("".join(p) for p in itertools.product("abcdefghijklm", repeat=2))
VALUE_SYMBOLS = tuple("".join(p) for p in itertools.product("nopqrstuvwxyz", repeat=2))


def document_rng(seed: int, task: int, length: int, sample: int) -> np.random.Generator:
    """The RNG of one document, seeded with (seed, task, length, sample): independent of the other
    lengths and of num_samples, so adding a length changes no document. ``task`` tells the tasks of
    one seed apart (each task its own number)."""
    return np.random.default_rng([seed, task, length, sample])


def test_split(docs: list[dict[str, Any]]) -> dict[str, datasets.Dataset]:
    """The documents as the ``test`` split a task's ``custom_dataset`` returns."""
    import datasets  # here, not at the top: the command line's help reads the tasks' constants

    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


def exact_match_results(doc: Mapping[str, Any], results: Sequence[str], pattern: str) -> dict[str, float]:
    """``exact_match@L`` (L the document's ``length``): the first match of ``pattern`` in the
    generation equals the document's ``answer``."""
    found = re.search(pattern, results[0])
    return {f"exact_match@{doc['length']}": float(found is not None and found.group(0) == doc["answer"])}


def check_choices_fit(
    docs: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any],
    tokenizer: Tokenizer | None,
    group: str,
    too_long: Callable[[Mapping[str, Any], int, int], str],
) -> None:
    """A ValueError with ``too_long(doc, tokens, max_length)`` for the first document whose longest
    context + " " + choice (what lm-eval scores as one sequence, cutting its start when it is longer
    than the model's max_length) exceeds it; nothing is checked when it is unknown. ``group`` names
    the options' group in a missing tokenizer's error."""
    limit = model_max_length(metadata, tokenizer)
    if limit is None:
        return
    count = token_counter(metadata, tokenizer, group)
    for doc in docs:
        tokens = max(count(f"{doc['context']} {choice}") for choice in doc["choices"])
        if tokens > limit:
            raise ValueError(too_long(doc, tokens, limit))
