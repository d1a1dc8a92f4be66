"""Importing ttt_mixer leaves transformers' Auto classes as they were.

Importing fla imports ``fla.models``, which registers fla's own configs with ``AutoConfig`` under
model types transformers already uses (``mamba``, ``mamba2``, ``bitnet``); from then on a checkpoint
of transformers' Mamba would load as fla's model, another implementation (on CPU it fails inside a
Triton kernel). When ttt_mixer's import is the one that first imports fla, every transformers model
type that the import remapped is registered back, through ``AutoConfig.register``, to the config
class it had before. fla's new model types (``gla``, ``delta_net``, ...) stay, and so do fla's own
registrations with ``AutoModel`` and ``AutoModelForCausalLM``: those key on fla's config classes,
which a transformers checkpoint no longer resolves to.

A user who imported fla before ttt_mixer chose fla's mapping; it is left as it is.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import transformers
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES


def _transformers_types_registered_over() -> dict[str, type]:
    """transformers' own model types that something has registered a config class for, with the
    class each maps to now. ``CONFIG_MAPPING.keys()`` lists transformers' types, then the registered
    ones, so such a type appears twice; only these are looked up (resolving all of transformers'
    ~800 types would import every config module, seconds at import)."""
    counts = Counter(CONFIG_MAPPING.keys())
    return {
        model_type: CONFIG_MAPPING[model_type]
        for model_type in CONFIG_MAPPING_NAMES
        if counts[model_type] > 1
    }


@contextmanager
def transformers_model_types_kept() -> Iterator[None]:
    """Around the first import of fla: afterwards, every transformers model type maps to the config
    class it mapped to before. Does nothing if fla was already imported (the user's choice)."""
    if "fla" in sys.modules:
        yield
        return
    before = _transformers_types_registered_over()
    yield
    for model_type, config_class in _transformers_types_registered_over().items():
        # not registered over before: transformers' own class, which CONFIG_MAPPING_NAMES names
        kept = before.get(model_type) or getattr(transformers, CONFIG_MAPPING_NAMES[model_type])
        if config_class is not kept:
            AutoConfig.register(model_type, kept, exist_ok=True)
