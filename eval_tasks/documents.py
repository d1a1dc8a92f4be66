"""Building a task's documents in code, shared by the generated task families (``recall``): an RNG
per document, the test split lm-eval reads, and per-length exact-match scoring."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets


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
