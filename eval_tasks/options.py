"""Reading the tasks' options from lm-eval's task ``metadata``.

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
from typing import Any

# what lm-eval itself puts into a task's metadata
LM_EVAL_KEYS = {"version"}


@functools.cache
def all_option_names() -> frozenset[str]:
    """Every group's options: a misspelling is recognised against all of them, whichever tasks run."""
    from . import perplexity, recall, recall_data, set_disjointness

    return (
        frozenset(recall.OPTION_DEFAULTS)
        | frozenset(perplexity.OPTION_DEFAULTS)
        | frozenset(recall_data.OPTION_DEFAULTS)
        | frozenset(set_disjointness.OPTION_DEFAULTS)
    )


@functools.cache
def model_argument_names() -> frozenset[str]:
    """The keyword arguments of lm-eval's HF model, which ``--model_args`` may hold."""
    from lm_eval.models.huggingface import HFLM

    return frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def task_options(
    metadata: Mapping[str, Any], defaults: Mapping[str, Any], prefixes: str | tuple[str, ...], group: str
) -> dict[str, Any]:
    """One task group's options from lm-eval's task ``metadata``, defaults filled in; ValueError for
    a key that can only be a misspelt option (module docstring)."""
    options = all_option_names() | set(defaults)
    for key in metadata:
        if key in options or key in LM_EVAL_KEYS:
            continue
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.8)
        if key.startswith(prefixes) or (close and key not in model_argument_names()):
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown {group} option {key!r}{hint}; the options are: {', '.join(sorted(defaults))}"
            )
    return {**defaults, **{k: v for k, v in metadata.items() if k in defaults}}
