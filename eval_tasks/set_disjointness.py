"""Set disjointness (Arora et al. 2024, "Just read twice"), a task of the ``ttt_recall_synthetic``
group built in code: ``ttt_set_disjointness`` and its JRT-prompt variant ``ttt_set_disjointness_twice``.

A document holds two sets of distinct symbols that share exactly one element, the first set, a
separator ``|``, the second set, then ``=``; the answer is the shared element. Which set comes first
decides what a recurrent state must keep: with the short set first it keeps a few symbols and checks
the long set against them; with the long set first it must keep them all. The twice variant gives
the two sets twice (``A | B | A | B =``), the paper's JRT prompt: on the second reading the model
knows both sets.

Options (``--metadata``; defaults ``OPTION_DEFAULTS``), besides the group's ``seed`` and
``num_samples``: ``sd_lengths``, the symbols in both sets together (L, the key of the metrics), and
``sd_first_fraction``, the first set's share of them (0.25: the short set first; 0.75: the long one).
Symbols are the MQAR keys and values (``documents.KEY_SYMBOLS``, ``VALUE_SYMBOLS``) (two-letter words, any tokenizer), so L is at most their
number. Scored by log-likelihood over every symbol of the document (chance 1 / (L - 1)): ``acc@L``,
and ``exact_match@L`` when greedy decoding writes the answer, as ``ttt_mqar`` is scored.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .documents import KEY_SYMBOLS, VALUE_SYMBOLS, check_choices_fit, document_rng, test_split
from .options import OPTION_GROUPS, int_list_option, int_option, task_options
from .tokens import Tokenizer

if TYPE_CHECKING:
    import datasets

GROUP = "ttt_set_disjointness"
OPTION_DEFAULTS = OPTION_GROUPS[GROUP].defaults  # (the group's row of options.OPTION_GROUPS)
SYMBOLS = KEY_SYMBOLS + VALUE_SYMBOLS
# the task number in the documents' RNG seeds (recall.py's tasks are 0 to 2)
TASK_SEED = 3


def parse_options(metadata: Mapping[str, Any]) -> tuple[int, int, tuple[int, ...], float]:
    """(seed, num_samples, sd_lengths, sd_first_fraction) from lm-eval's task ``metadata``; ValueError
    naming the option for a malformed value or an unknown ``sd_`` key."""
    get = task_options(metadata, GROUP).__getitem__
    fraction = get("sd_first_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ValueError(
            f"ttt_set_disjointness option 'sd_first_fraction' must be a number in (0, 1), got {fraction!r}"
        )
    lengths = int_list_option(GROUP, "sd_lengths", get("sd_lengths"), 3)
    if max(lengths) > len(SYMBOLS) + 1:
        raise ValueError(
            f"ttt_set_disjointness option 'sd_lengths' must be at most {len(SYMBOLS) + 1} (the symbols "
            f"available, one shared), got {max(lengths)}"
        )
    return (
        int_option(GROUP, "seed", get("seed"), 0),
        int_option(GROUP, "num_samples", get("num_samples"), 1),
        lengths,
        float(fraction),
    )


def set_sizes(length: int, first_fraction: float) -> tuple[int, int]:
    """The two sets' sizes for ``length`` symbols: the first round(first_fraction * length), each at
    least 1."""
    first = min(max(round(first_fraction * length), 1), length - 1)
    return first, length - first


def sets(rng: np.random.Generator, length: int, first_fraction: float) -> tuple[list[str], list[str], str]:
    """(first set, second set, shared element): ``length`` symbols in all, distinct but for the one
    shared, each set in a random order."""
    first_size, _ = set_sizes(length, first_fraction)
    drawn = [SYMBOLS[i] for i in rng.choice(len(SYMBOLS), size=length - 1, replace=False)]
    shared = drawn[0]
    first = [shared, *drawn[1:first_size]]
    second = [shared, *drawn[first_size:]]
    return list(rng.permutation(first)), list(rng.permutation(second)), shared


def prompt(first: list[str], second: list[str], twice: bool) -> str:
    """``A | B =`` or, read twice, ``A | B | A | B =``."""
    once = f"{' '.join(first)} | {' '.join(second)}"
    return f"{once} | {once} =" if twice else f"{once} ="


def _documents(
    twice: bool, tokenizer: Tokenizer | None, metadata: Mapping[str, Any]
) -> dict[str, datasets.Dataset]:
    seed, num_samples, lengths, first_fraction = parse_options(metadata)
    docs = []
    for i, length in itertools.product(range(num_samples), lengths):
        first, second, shared = sets(document_rng(seed, TASK_SEED, length, i), length, first_fraction)
        choices = sorted(set(first) | set(second))
        docs.append(
            {
                "context": prompt(first, second, twice),
                "choices": choices,
                "gold": choices.index(shared),
                "length": length,
            }
        )
    check_choices_fit(
        docs,
        metadata,
        tokenizer,
        GROUP,
        lambda doc, tokens, limit: (
            f"ttt_set_disjointness option 'sd_lengths': {doc['length']} symbols take {tokens} tokens, "
            f"more than the model's max_length {limit}; lower sd_lengths"
        ),
    )
    return test_split(docs)


def set_disjointness_dataset(
    tokenizer: Tokenizer | None = None, **metadata: Any
) -> dict[str, datasets.Dataset]:
    """The documents of ``ttt_set_disjointness``, interleaved across lengths (sample 0 at every
    length, then sample 1, ...)."""
    return _documents(False, tokenizer, metadata)


def set_disjointness_twice_dataset(
    tokenizer: Tokenizer | None = None, **metadata: Any
) -> dict[str, datasets.Dataset]:
    """The documents of ``ttt_set_disjointness_twice``: the same sets, each context given twice."""
    return _documents(True, tokenizer, metadata)
