"""Synthetic recall tasks of the ``ttt_recall`` group, built in code: ``ttt_mqar``, ``ttt_mqar_twice``
(MQAR with the JRT prompt), ``ttt_phonebook`` and ``ttt_passkey``.

lm-eval calls the ``*_dataset`` functions (``custom_dataset`` in the task YAMLs) with the task's
``metadata``: the YAML's own (``version``), the parsed ``--model_args`` (``pretrained``,
``trust_remote_code``, ...) and the ``--metadata`` JSON, merged. :func:`parse_options` reads the
group's options from it (their defaults: the ``ttt_recall`` row of ``options.OPTION_GROUPS``); other
keys belong to the model or lm-eval and are ignored, except that a key with one of the group's
prefixes (``mqar_``, ``phonebook_``, ``passkey_``, ``ttt_recall_``) that is not an option is
rejected, to catch typos. The tokenizer that sizes prompts and the model's ``max_length`` come from
``tokens``, the documents' RNG, split and exact-match scoring from ``documents``.

Every document records its context length, and the ``*_process_results`` functions score it under a
key named after that length (``acc@128``, ``exact_match@1024``), which lm-eval averages over the
documents of that length: the results JSON holds one number per task, metric and length. The
documents are interleaved across lengths (sample 0 at every length, then sample 1, ...), so that a
small ``--limit`` still covers every length.

Every document fits the model's ``max_length`` as lm-eval reads it (``tokens.model_max_length``), so
lm-eval never cuts a prompt (it drops the start of one that is too long, and with it a needle, the
keys or the queries). A phonebook or passkey length L is the model's whole window: the prompt, as
lm-eval tokenizes it, takes at most L minus the task's ``max_gen_toks`` tokens (lm-eval keeps that
many free to generate in), and an L above ``max_length`` is a ValueError. An MQAR document (the
context and each choice, scored by log-likelihood) longer than ``max_length`` is a ValueError too.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .documents import (
    KEY_SYMBOLS,
    VALUE_SYMBOLS,
    check_choices_fit,
    document_rng,
    exact_match_results,
    test_split,
)
from .options import OPTION_GROUPS, int_list_option, int_option, task_options
from .tokens import TokenCounter, Tokenizer, fill_to_length, model_max_length, token_counter

if TYPE_CHECKING:
    import datasets

# ---------------------------------------------------------------------------------------- options

GROUP = "ttt_recall"
OPTION_DEFAULTS = OPTION_GROUPS[GROUP].defaults  # (the group's row of options.OPTION_GROUPS)


@dataclass(frozen=True)
class RecallOptions:
    seed: int
    num_samples: int
    context_lengths: tuple[int, ...]
    mqar_seq_lengths: tuple[int, ...]
    mqar_num_kv_pairs: int
    mqar_power_a: float
    passkey_digits: int
    passkey_depths: tuple[float, ...]


def parse_options(metadata: Mapping[str, Any]) -> RecallOptions:
    """This module's options from lm-eval's task ``metadata``, defaults filled in; raises ValueError
    naming the option for a malformed value or an unknown prefixed key."""
    get = task_options(metadata, GROUP).__getitem__
    power_a = get("mqar_power_a")
    if isinstance(power_a, bool) or not isinstance(power_a, int | float) or not 0 < power_a <= 1:
        raise ValueError(f"ttt_recall option 'mqar_power_a' must be a number in (0, 1], got {power_a!r}")
    depths = get("passkey_depths")
    depths = depths if isinstance(depths, list | tuple) else [depths]
    if not depths or not all(
        isinstance(d, int | float) and not isinstance(d, bool) and 0 <= d <= 1 for d in depths
    ):
        raise ValueError(f"ttt_recall option 'passkey_depths' must list numbers in [0, 1], got {depths!r}")
    return RecallOptions(
        seed=int_option(GROUP, "seed", get("seed"), 0),
        num_samples=int_option(GROUP, "num_samples", get("num_samples"), 1),
        context_lengths=int_list_option(GROUP, "context_lengths", get("context_lengths"), 1),
        mqar_seq_lengths=int_list_option(GROUP, "mqar_seq_lengths", get("mqar_seq_lengths"), 1),
        mqar_num_kv_pairs=int_option(GROUP, "mqar_num_kv_pairs", get("mqar_num_kv_pairs"), 1, len(MQAR_KEYS)),
        mqar_power_a=float(power_a),
        passkey_digits=int_option(
            GROUP, "passkey_digits", get("passkey_digits"), 1, 20
        ),  # max_gen_toks is 32
        passkey_depths=tuple(float(d) for d in depths),
    )


# ------------------------------------------------------------------------------------------- MQAR

# Zoology's vocabulary split in two (documents.KEY_SYMBOLS, VALUE_SYMBOLS), so no key is ever a value
MQAR_KEYS = KEY_SYMBOLS
MQAR_VALUES = VALUE_SYMBOLS


@dataclass(frozen=True)
class MQARSequence:
    """One Zoology multi-query associative recall sequence, as symbols.

    ``symbols[:2 * num_kv_pairs]`` are the pairs ``k1 v1 k2 v2 ...``; in the rest, the query region,
    slot ``2 * g`` holds a queried key for each of the drawn gaps ``g`` and every other slot a random
    filler symbol (Zoology's ``random_non_queries``; here never one of this sequence's keys, so that
    a key appears only as a pair or a query). ``query_positions[i]`` is the index of the i-th query
    in reading order, ``answers[i]`` the value bound to its key."""

    symbols: tuple[str, ...]
    keys: tuple[str, ...]
    values: tuple[str, ...]
    query_positions: tuple[int, ...]
    gaps: tuple[int, ...]
    answers: tuple[str, ...]


def mqar_min_length(num_kv_pairs: int) -> int:
    """Zoology's bound: the pairs, and a query region with a slot pair for every key."""
    return 4 * num_kv_pairs


def mqar_sequence(rng: np.random.Generator, seq_len: int, num_kv_pairs: int, power_a: float) -> MQARSequence:
    """Zoology's ``multiquery_ar`` for one example: distinct keys and values, every key queried once,
    at gaps drawn without replacement with probabilities ∝ (g + 1) ** (power_a - 1)."""
    if not 1 <= num_kv_pairs <= len(MQAR_KEYS):
        raise ValueError(f"ttt_recall option 'mqar_num_kv_pairs' must be in [1, {len(MQAR_KEYS)}]")
    if seq_len < mqar_min_length(num_kv_pairs):
        raise ValueError(
            f"ttt_recall option 'mqar_seq_lengths': {seq_len} is below 4 * mqar_num_kv_pairs = "
            f"{mqar_min_length(num_kv_pairs)}, the shortest sequence that holds the pairs and their queries"
        )
    key_idx = rng.choice(len(MQAR_KEYS), size=num_kv_pairs, replace=False)
    keys = tuple(MQAR_KEYS[i] for i in key_idx)
    values = tuple(MQAR_VALUES[i] for i in rng.choice(len(MQAR_VALUES), size=num_kv_pairs, replace=False))
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2
    p = power_a * np.arange(1, space + 1, dtype=float) ** (power_a - 1)
    gaps = rng.choice(space, size=num_kv_pairs, replace=False, p=p / p.sum())
    filler = [s for s in MQAR_KEYS + MQAR_VALUES if s not in set(keys)]
    symbols = [filler[i] for i in rng.integers(len(filler), size=seq_len)]
    symbols[0:context:2], symbols[1:context:2] = keys, values
    for key, gap in zip(keys, gaps, strict=True):
        symbols[context + 2 * gap] = key
    order = np.argsort(gaps)
    return MQARSequence(
        symbols=tuple(symbols),
        keys=keys,
        values=values,
        query_positions=tuple(context + 2 * int(gaps[i]) for i in order),
        gaps=tuple(int(gaps[i]) for i in order),
        answers=tuple(values[i] for i in order),
    )


def mqar_dataset(tokenizer: Tokenizer | None = None, **metadata: Any) -> dict[str, datasets.Dataset]:
    """One document per query: the sequence read up to and including the queried key (what a causal
    model sees when Zoology scores that position), the sequence's values as choices, the bound value
    as gold. Lengths are symbols; when the model's max_length is known, every document (context and
    each choice, as lm-eval encodes them) must fit it."""
    options = parse_options(metadata)
    for length in options.mqar_seq_lengths:  # all lengths checked before any is built
        mqar_sequence(document_rng(0, 0, 0, 0), length, options.mqar_num_kv_pairs, options.mqar_power_a)
    sequences = {
        (length, i): mqar_sequence(
            document_rng(options.seed, 0, length, i), length, options.mqar_num_kv_pairs, options.mqar_power_a
        )
        for length in options.mqar_seq_lengths
        for i in range(options.num_samples)
    }
    docs = []
    for i, query, length in itertools.product(
        range(options.num_samples), range(options.mqar_num_kv_pairs), options.mqar_seq_lengths
    ):
        seq = sequences[length, i]
        position = seq.query_positions[query]
        docs.append(
            {
                "context": " ".join(seq.symbols[: position + 1]),
                "choices": list(seq.values),
                "gold": seq.values.index(seq.answers[query]),
                "length": length,
                "gap": seq.gaps[query],
            }
        )
    check_choices_fit(
        docs,
        metadata,
        tokenizer,
        GROUP,
        lambda doc, tokens, limit: (
            f"ttt_recall option 'mqar_seq_lengths': a sequence of {doc['length']} symbols takes "
            f"{tokens} tokens, more than the model's max_length {limit}, and lm-eval would cut "
            "its start; lower mqar_seq_lengths, or pass --model_args ...,max_length=N for a "
            "model that reads more"
        ),
    )
    return test_split(docs)


def mqar_process_results(doc: Mapping[str, Any], results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """``acc@L``: the gold value has the highest log-likelihood among the sequence's values (chance:
    1 / mqar_num_kv_pairs), a graded signal even for a small model; ``exact_match@L``: greedy
    decoding writes the gold value exactly (Zoology's argmax over the whole vocabulary; chance ~0)."""
    lls = [ll for ll, _ in results]
    gold = doc["gold"]
    length = doc["length"]
    return {
        f"acc@{length}": float(int(np.argmax(lls)) == gold),
        f"exact_match@{length}": float(results[gold][1]),
    }


# ------------------------------------------------------------- context lengths (phonebook, passkey)


def read_pairs_twice(context: str, num_kv_pairs: int) -> str:
    """A ``ttt_mqar`` context with its first ``num_kv_pairs`` key-value pairs put before it again."""
    symbols = context.split(" ")
    return " ".join(symbols[: 2 * num_kv_pairs] + symbols)


def mqar_twice_dataset(tokenizer: Tokenizer | None = None, **metadata: Any) -> dict[str, datasets.Dataset]:
    """``ttt_mqar_twice``'s documents: ``ttt_mqar``'s (same seed, order and scoring), each with its key-value
    pairs read twice, as the JRT prompt (Arora et al. 2024, "Just read twice") gives them: ``k1 v1 ... kn vn``,
    then the whole ``ttt_mqar`` sequence, so a recurrent model meets the pairs a second time knowing
    them. Each document is 2 * mqar_num_kv_pairs symbols longer and must fit the model's max_length
    too."""
    pairs = parse_options(metadata).mqar_num_kv_pairs
    docs = mqar_dataset(tokenizer, **metadata)["test"].to_list()
    for doc in docs:
        doc["context"] = read_pairs_twice(doc["context"], pairs)
    check_choices_fit(
        docs,
        metadata,
        tokenizer,
        GROUP,
        lambda doc, tokens, limit: (
            f"ttt_recall option 'mqar_seq_lengths': a sequence of {doc['length']} symbols with its "
            f"pairs read twice takes {tokens} tokens, more than the model's max_length {limit}; lower "
            "mqar_seq_lengths, or pass --model_args ...,max_length=N for a model that reads more"
        ),
    )
    return test_split(docs)


def _check_lengths(lengths: Sequence[int], minimum: int, what: str, limit: int | None) -> None:
    short = [n for n in lengths if n < minimum]
    if short:
        raise ValueError(
            f"ttt_recall option 'context_lengths': {short} below {minimum} tokens, the {what} "
            "and the tokens generated, with this tokenizer"
        )
    long = [n for n in lengths if limit is not None and n > limit]
    if long:
        raise ValueError(
            f"ttt_recall option 'context_lengths': {long} above the model's max_length {limit}, and "
            f"lm-eval would cut the start of such a prompt; pass lengths <= {limit}, or --model_args "
            "...,max_length=N for a model that reads more"
        )


# -------------------------------------------------------------------------------------- phonebook

PHONEBOOK_HEADER = "Below is a phonebook. Remember the numbers.\n"
PHONEBOOK_QUESTION = "\nWhat is the phone number of {name}? The number is"
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
PHONE_PATTERN = r"\d{3}-\d{4}"
PHONEBOOK_MAX_GEN_TOKS = 16  # generation_kwargs.max_gen_toks of ttt_phonebook.yaml


def _name(rng: np.random.Generator) -> str:
    def word() -> str:
        syllables = int(rng.integers(2, 4))
        return "".join(
            _CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(syllables)
        ).capitalize()

    return f"{word()} {word()}"


def phonebook_entries(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """``count`` entries with distinct names (two pseudo-words of 2-3 syllables) and distinct numbers
    (``ddd-dddd``)."""
    names: dict[str, None] = {}
    while len(names) < count:
        names[_name(rng)] = None
    numbers = rng.choice(10**7, size=count, replace=False)
    return [(name, f"{n // 10**4:03d}-{n % 10**4:04d}") for name, n in zip(names, numbers, strict=True)]


def phonebook_prompt(entries: Sequence[tuple[str, str]], name: str) -> str:
    return (
        PHONEBOOK_HEADER
        + "".join(f"{n}: {number}\n" for n, number in entries)
        + PHONEBOOK_QUESTION.format(name=name)
    )


def phonebook_doc(rng: np.random.Generator, count: TokenCounter, length: int) -> dict[str, Any]:
    """A phonebook of as many entries as fit in ``length`` tokens with the tokens generated after
    it, and a question for one of them, placed at a uniformly drawn depth."""
    # every entry costs at least 6 tokens (name, ': ', 3 digits, '-', 4 digits, newline)
    (queried, *others) = phonebook_entries(rng, max(2, length // 6))
    depth = float(rng.random())

    def entries(n: int) -> list[tuple[str, str]]:
        kept = others[: max(n, 1)]
        return [*kept[: round(depth * len(kept))], queried, *kept[round(depth * len(kept)) :]]

    prompt, n = fill_to_length(
        lambda n: phonebook_prompt(entries(n), queried[0]),
        count,
        length - PHONEBOOK_MAX_GEN_TOKS,
        len(others),
    )
    return {"context": prompt, "answer": queried[1], "length": length, "entries": len(entries(n))}


def phonebook_dataset(tokenizer: Tokenizer | None = None, **metadata: Any) -> dict[str, datasets.Dataset]:
    options = parse_options(metadata)
    count = token_counter(metadata, tokenizer, GROUP)
    minimum = count(phonebook_prompt(phonebook_entries(document_rng(0, 1, 0, 0), 2), "Zuzuzu Zuzuzu")) + 8
    _check_lengths(
        options.context_lengths,
        minimum + PHONEBOOK_MAX_GEN_TOKS,
        "phonebook prompt with two entries",
        model_max_length(metadata, tokenizer),
    )
    return test_split(
        [
            phonebook_doc(document_rng(options.seed, 1, length, i), count, length)
            for i in range(options.num_samples)
            for length in options.context_lengths
        ]
    )


def phonebook_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    return exact_match_results(doc, results, PHONE_PATTERN)


# ---------------------------------------------------------------------------------------- passkey

PASSKEY_HEADER = "A pass key is hidden in the text below. Remember it.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_FILLER_WORDS = PASSKEY_FILLER.split()
PASSKEY_MAX_GEN_TOKS = 32  # generation_kwargs.max_gen_toks of ttt_passkey.yaml


def passkey_prompt(key: str, filler_words: int, depth: float) -> str:
    """Header, ``filler_words`` words of the repeated filler with the needle inserted at the sentence
    boundary nearest to ``depth`` (0: first, 1: last), question."""
    words = list(itertools.islice(itertools.cycle(_FILLER_WORDS), filler_words))
    boundaries = [0] + [i + 1 for i, w in enumerate(words) if w.endswith(".")]
    cut = min(boundaries, key=lambda b: abs(b - depth * filler_words))
    before, after = " ".join(words[:cut]), " ".join(words[cut:])
    text = (before + " " if before else "") + PASSKEY_NEEDLE.format(key=key) + after
    return PASSKEY_HEADER + text.rstrip() + PASSKEY_QUESTION


def passkey_doc(
    rng: np.random.Generator, count: TokenCounter, length: int, digits: int, depth: float
) -> dict[str, Any]:
    key = "".join(str(d) for d in [rng.integers(1, 10), *rng.integers(0, 10, size=digits - 1)])
    budget = length - PASSKEY_MAX_GEN_TOKS  # tokens lm-eval leaves the prompt
    prompt, _ = fill_to_length(lambda n: passkey_prompt(key, n, depth), count, budget, budget)
    return {"context": prompt, "answer": key, "length": length, "depth": depth}


def passkey_dataset(tokenizer: Tokenizer | None = None, **metadata: Any) -> dict[str, datasets.Dataset]:
    options = parse_options(metadata)
    count = token_counter(metadata, tokenizer, GROUP)
    minimum = count(passkey_prompt("9" * options.passkey_digits, 0, 0.0)) + 8
    _check_lengths(
        options.context_lengths,
        minimum + PASSKEY_MAX_GEN_TOKS,
        "passkey prompt without filler",
        model_max_length(metadata, tokenizer),
    )
    depths = options.passkey_depths
    return test_split(
        [
            passkey_doc(
                document_rng(options.seed, 2, length, i),
                count,
                length,
                options.passkey_digits,
                depths[i % len(depths)],
            )
            for i in range(options.num_samples)
            for length in options.context_lengths
        ]
    )


def passkey_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    return exact_match_results(doc, results, r"\d+")
