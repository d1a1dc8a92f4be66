"""The tasks' options: every group's options and defaults (``OPTION_GROUPS``), and reading a group's
options from lm-eval's task ``metadata`` (``task_options``). This module imports no task module: the
task modules import it.

lm-eval hands a task one mapping: the model's arguments (``--model_args``) merged with
``--metadata``. So a key that is no option of ours may be the model's and is left alone, except when
it carries one of a group's prefixes (then it can only be a misspelt option of that group) or when
it is close to an option name of any group and is no argument of lm-eval's HF model (then it is a
misspelt option, such as ``context_length`` for ``context_lengths``): both are ValueErrors that name
the key and the closest option.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# what lm-eval itself puts into a task's metadata
LM_EVAL_KEYS = {"version"}


@dataclass(frozen=True)
class OptionGroup:
    """One task group's options: their defaults, and the prefixes that mark a key as the group's."""

    defaults: Mapping[str, Any]
    prefixes: tuple[str, ...]


# Every group's options, in one table: a misspelling is recognised against all of them whichever
# tasks run. A new task family adds its row here (and documents it in ttt_mixer.cli's EVAL_EPILOG).
OPTION_GROUPS: dict[str, OptionGroup] = {
    # recall.py: ttt_mqar, ttt_phonebook, ttt_passkey
    "ttt_recall": OptionGroup(
        defaults={
            "seed": 1234,  # every document is drawn from an RNG seeded with (seed, task, length, sample)
            "num_samples": 50,  # documents per length (MQAR: sequences per length, each giving one per query)
            "context_lengths": [
                1024,
                2048,
                4096,
            ],  # phonebook, passkey: prompt + max_gen_toks, model's tokens
            "mqar_seq_lengths": [64, 128, 256],  # Zoology's input_seq_len, in symbols (keys, values, filler)
            "mqar_num_kv_pairs": 8,  # key-value pairs per sequence; every key is queried once
            "mqar_power_a": 0.01,  # query gaps g = 0, 1, ... are drawn with p(g) ∝ (g + 1) ** (power_a - 1)
            "passkey_digits": 5,  # digits of the passkey
            "passkey_depths": [0.0, 0.25, 0.5, 0.75, 1.0],  # where the needle sits in the filler, cycled
        },
        prefixes=("mqar_", "phonebook_", "passkey_", "ttt_recall_"),
    ),
    # perplexity.py: ttt_ppl_rolling, ttt_ppl_position
    "ttt_ppl": OptionGroup(
        defaults={
            "ppl_files": None,  # local text files, one document each: a glob or a list of paths/globs
            "ppl_dataset": "emozilla/pg19-test",  # else this dataset (hub id or local folder)
            "ppl_dataset_split": "test",
            "ppl_text_column": "text",
            "ppl_bucket_edges": [0, 512, 1024, 2048, 4096, 8192, 16384, 32768],  # tokens
            "ppl_max_tokens": 32768,  # documents are cut to this many tokens
        },
        prefixes=("ppl_",),
    ),
    # set_disjointness.py: ttt_set_disjointness and ttt_set_disjointness_twice
    "ttt_set_disjointness": OptionGroup(
        defaults={
            "seed": 1234,  # every document is drawn from an RNG seeded with (seed, task, length, sample)
            "num_samples": 50,  # documents per length
            "sd_lengths": [16, 32, 64],  # symbols in the two sets together
            "sd_first_fraction": 0.25,  # the first set's share of them
        },
        prefixes=("sd_",),
    ),
    # recall_data.py: ttt_swde, ttt_fda, ttt_squad_completion and their _twice variants
    "ttt_recall_data": OptionGroup(defaults={"recall_data_files": {}}, prefixes=("recall_data",)),
}


@functools.cache
def all_option_names() -> frozenset[str]:
    """Every group's options."""
    return frozenset(name for group in OPTION_GROUPS.values() for name in group.defaults)


@functools.cache
def model_argument_names() -> frozenset[str]:
    """The keyword arguments of lm-eval's HF model, which ``--model_args`` may hold."""
    from lm_eval.models.huggingface import HFLM

    return frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def task_options(metadata: Mapping[str, Any], group: str) -> dict[str, Any]:
    """The options of ``group`` (a key of ``OPTION_GROUPS``) from lm-eval's task ``metadata``,
    defaults filled in; ValueError for a key that can only be a misspelt option (module docstring)."""
    defaults = OPTION_GROUPS[group].defaults
    options = all_option_names()
    for key in metadata:
        if key in options or key in LM_EVAL_KEYS:
            continue
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.8)
        if key.startswith(OPTION_GROUPS[group].prefixes) or (close and key not in model_argument_names()):
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown {group} option {key!r}{hint}; the options are: {', '.join(sorted(defaults))}"
            )
    return {**defaults, **{k: v for k, v in metadata.items() if k in defaults}}


def int_option(group: str, name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` of ``group``'s option ``name`` if it is an integer in bounds, else a ValueError naming
    the option and the bounds."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{group} option {name!r} must be an integer {bounds}, got {value!r}")
    return value


def int_list_option(group: str, name: str, value: Any, minimum: int) -> tuple[int, ...]:
    """``int_option`` for each of ``value`` (one integer or a non-empty list of them)."""
    values = value if isinstance(value, list | tuple) else [value]
    if not values:
        raise ValueError(f"{group} option {name!r} must list at least one length")
    return tuple(int_option(group, name, v, minimum) for v in values)
