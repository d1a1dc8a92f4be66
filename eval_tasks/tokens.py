"""The model's tokenizer as the tasks use it: finding it from lm-eval's task ``metadata``, counting
the tokens lm-eval feeds the model for a text, the most tokens lm-eval's model reads, and sizing a
prompt to a number of tokens. Shared by the task families (``recall``, ``perplexity``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

Tokenizer = Any  # a transformers tokenizer: anything with __call__(text).input_ids
TokenCounter = Callable[[str], int]


@functools.cache
def _load_tokenizer(name: str, trust_remote_code: bool) -> Tokenizer:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def resolve_tokenizer(metadata: Mapping[str, Any], tokenizer: Tokenizer | None, group: str) -> Tokenizer:
    """The model's tokenizer, as lm-eval's RULER tasks find it: ``tokenizer`` in the metadata, else
    the model's ``pretrained`` (both arrive from ``--model_args``, or ``tokenizer`` from
    ``--metadata``); an explicit ``tokenizer`` object (tests) wins."""
    if tokenizer is not None:
        return tokenizer
    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"{group} option 'tokenizer': these tasks count tokens with the model's tokenizer; "
            "pass --model_args pretrained=... or --metadata '{\"tokenizer\": ...}'"
        )
    return _load_tokenizer(name, bool(metadata_flag(metadata, "trust_remote_code")))


def metadata_flag(metadata: Mapping[str, Any], name: str) -> bool | None:
    """A true/false model argument of the metadata (``--model_args`` gives it as text), None if absent."""
    value = metadata.get(name)
    return None if value is None else str(value).lower() == "true"


def token_counter(metadata: Mapping[str, Any], tokenizer: Tokenizer | None, group: str) -> TokenCounter:
    """Counts the tokens lm-eval's hf model feeds the model for a text: the tokenizer's own special
    tokens included (a BOS token, for a tokenizer that adds one) unless ``add_bos_token`` of
    ``--model_args`` says otherwise, as ``HFLM.tok_encode`` and ``tok_batch_encode`` encode. The
    tokenizer: ``resolve_tokenizer``'s, ``group`` naming the options' group in its error."""
    tokenizer = resolve_tokenizer(metadata, tokenizer, group)
    add_bos = metadata_flag(metadata, "add_bos_token")
    special = {} if add_bos is None else {"add_special_tokens": add_bos}
    return lambda text: len(tokenizer(text, **special).input_ids)


def model_max_length(metadata: Mapping[str, Any], tokenizer: Tokenizer | None = None) -> int | None:
    """The most tokens lm-eval's hf model reads (``HFLM.max_length``): ``max_length`` of
    ``--model_args`` (or ``--metadata``), else lm-eval's own ``resolve_max_length`` of the model's
    config and tokenizer. None when no config can be read (no ``pretrained``, or a model lm-eval
    loads otherwise): then nothing is checked against it."""
    value = metadata.get("max_length")
    if value not in (None, ""):
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model argument 'max_length' must be a positive integer, got {value!r}")
        return value
    name = metadata.get("pretrained")
    if not isinstance(name, str) or not name:
        return None
    from lm_eval.models.utils import DEFAULT_MAX_LENGTH, resolve_max_length
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            name, trust_remote_code=bool(metadata_flag(metadata, "trust_remote_code"))
        )
    except (OSError, ValueError):  # no config transformers reads (lm-eval may load it otherwise)
        return None
    return resolve_max_length(config, tokenizer, default=DEFAULT_MAX_LENGTH)


def fill_to_length(
    build: Callable[[int], str], count: TokenCounter, length: int, max_units: int
) -> tuple[str, int]:
    """The prompt ``build(n)`` with the most filler units ``n <= max_units`` that stays within
    ``length`` tokens; assumes the token count grows with ``n``. Bisection: ~log2(max_units)
    tokenizations."""
    lo, hi = 0, max_units
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(build(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    return build(lo), lo
