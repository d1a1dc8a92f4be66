"""Perplexity tasks of the ``ttt_ppl`` group: ``ttt_ppl_rolling`` and ``ttt_ppl_position``.

Documents are local text files, one document a file (``ppl_files``: a glob, or a list of paths and
globs, relative to the working directory), or else the ``ppl_text_column`` column of a dataset
(``ppl_dataset``, split ``ppl_dataset_split``; by default the PG19 test split,
``emozilla/pg19-test``, a parquet copy of ``deepmind/pg19``'s 100 test books). Each document is cut
to its first ``ppl_max_tokens`` tokens of the model's tokenizer (``pretrained`` from
``--model_args``, or ``tokenizer`` in ``--metadata``, as the ``ttt_recall`` tasks size prompts).

- ``ttt_ppl_rolling``: lm-eval's rolling log-likelihood (``loglikelihood_rolling``) of every
  document, with the metrics ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` of
  lm-eval's ``wikitext`` task. lm-eval reads a document in windows of the model's ``max_length``.
- ``ttt_ppl_position``: perplexity per position bucket, the TTT paper's perplexity-vs-token-index
  curve. ``ppl_bucket_edges`` (tokens) cut each document into buckets; bucket ``[a, b)`` is one
  ``loglikelihood`` request whose context is the document up to token ``a`` and whose continuation
  is the text of tokens ``a`` to ``b``. The model thus reads the whole prefix before every bucket:
  the state runs through the whole document with no window reset, with lm-eval's stock ``--model
  hf`` loader, as long as the document fits the model's ``max_length`` (lm-eval would cut the
  prefix's start otherwise). Pass ``--model_args ...,max_length=32768`` for long documents: the
  dataset function raises a ValueError naming ``ppl_max_tokens`` when a document is longer than
  the model's ``max_length`` (``max_length`` of ``--model_args``, else lm-eval's default for the
  model's config). The document's first token is the first bucket's context (lm-eval adds the
  tokenizer's BOS token to every context when the tokenizer adds one), so every later token is
  scored exactly once. A bucket edge whose prefix text ends in whitespace moves forward to the next
  token (lm-eval moves a context's trailing whitespace into the continuation, which would score it
  twice). Metrics ``ppl@a-b`` for every bucket and ``ppl`` for the whole document, each the
  exponential of the total negative log-likelihood over the total tokens of all documents
  (:func:`token_perplexity`), not a mean of per-document perplexities.

Bucket edges are tokens of the task's tokenizer; lm-eval re-tokenizes each context and
continuation, which for a BPE tokenizer may merge a few tokens differently at a bucket's edge (a
character tokenizer gives exactly the same tokens).
"""

from __future__ import annotations

import glob
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from .options import task_options
from .tokens import Tokenizer, model_max_length, resolve_tokenizer

GROUP = "ttt_ppl"  # its options: the group's row of options.OPTION_GROUPS
# characters kept per token before tokenizing a document, so a whole book is not tokenized to keep
# its first ppl_max_tokens tokens; no tokenizer makes a token longer than this of ordinary text
CHARS_PER_TOKEN_BOUND = 64


def _error(option: str, message: str) -> ValueError:
    return ValueError(f"ttt_ppl option {option!r} {message}")


@dataclass(frozen=True)
class PerplexityOptions:
    files: tuple[str, ...] | None
    dataset: str
    dataset_split: str
    text_column: str
    bucket_edges: tuple[int, ...]
    max_tokens: int


def _positive_int(option: str, value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(option, f"must be a positive integer, got {value!r}")
    return value


def parse_options(metadata: Mapping[str, Any]) -> PerplexityOptions:
    """This module's options from lm-eval's task ``metadata``, defaults filled in; raises ValueError
    naming the option for a malformed value or an unknown ``ppl_`` key."""
    get = task_options(metadata, GROUP).__getitem__
    files = get("ppl_files")
    if files is not None:
        files = [files] if isinstance(files, str) else files
        if (
            not isinstance(files, list | tuple)
            or not files
            or not all(isinstance(f, str) and f for f in files)
        ):
            raise _error("ppl_files", f"must be a glob or a list of paths and globs, got {files!r}")
        files = tuple(files)
    for option in ("ppl_dataset", "ppl_dataset_split", "ppl_text_column"):
        if not isinstance(get(option), str) or not get(option):
            raise _error(option, f"must be a non-empty string, got {get(option)!r}")
    edges = get("ppl_bucket_edges")
    if (
        not isinstance(edges, list | tuple)
        or len(edges) < 2
        or not all(isinstance(e, int) and not isinstance(e, bool) for e in edges)
        or edges[0] != 0
        or any(a >= b for a, b in itertools.pairwise(edges))
    ):
        raise _error("ppl_bucket_edges", f"must list increasing token positions from 0, got {edges!r}")
    return PerplexityOptions(
        files=files,
        dataset=get("ppl_dataset"),
        dataset_split=get("ppl_dataset_split"),
        text_column=get("ppl_text_column"),
        bucket_edges=tuple(edges),
        max_tokens=_positive_int("ppl_max_tokens", get("ppl_max_tokens")),
    )


# -------------------------------------------------------------------------------------- documents


def load_texts(options: PerplexityOptions) -> list[tuple[str, str]]:
    """``(name, text)`` of every document: the files of ``ppl_files`` in the order given (a glob's
    matches sorted), else the rows of the dataset."""
    if options.files is not None:
        paths: list[str] = []
        for pattern in options.files:
            matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
            matches = [m for m in matches if Path(m).is_file()]
            if not matches:
                raise _error("ppl_files", f"matches no file: {pattern!r}")
            paths.extend(m for m in matches if m not in paths)
        return [(path, Path(path).read_text(encoding="utf-8")) for path in paths]
    if Path(options.dataset).exists():
        data = datasets.load_from_disk(options.dataset)
        data = data[options.dataset_split] if isinstance(data, datasets.DatasetDict) else data
    else:
        data = datasets.load_dataset(options.dataset, split=options.dataset_split)
    if options.text_column not in data.column_names:
        raise _error(
            "ppl_text_column",
            f"{options.text_column!r} is not a column of {options.dataset}: {data.column_names}",
        )
    return [(f"{options.dataset}/{i}", text) for i, text in enumerate(data[options.text_column])]


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def truncate(tokenizer: Tokenizer, text: str, max_tokens: int) -> tuple[str, list[int]]:
    """The text of the document's first ``max_tokens`` tokens, and those tokens."""
    ids = _encode(tokenizer, text[: max_tokens * CHARS_PER_TOKEN_BOUND])
    if len(ids) <= max_tokens and len(text) <= max_tokens * CHARS_PER_TOKEN_BOUND:
        return text, ids
    ids = ids[:max_tokens]
    return _decode(tokenizer, ids), ids


def _documents(
    tokenizer: Tokenizer | None, metadata: Mapping[str, Any], max_tokens: int
) -> list[dict[str, Any]]:
    options = parse_options(metadata)
    tokenizer = resolve_tokenizer(metadata, tokenizer, GROUP)
    docs = []
    for name, text in load_texts(options):
        text, ids = truncate(tokenizer, text.strip(), min(max_tokens, options.max_tokens))
        if ids:
            docs.append({"name": name, "text": text, "ids": ids})
    if not docs:
        raise _error("ppl_files" if options.files else "ppl_dataset", "gives no non-empty document")
    return docs


# ---------------------------------------------------------------------------------------- rolling


def rolling_dataset(tokenizer: Tokenizer | None = None, **metadata: Any) -> dict[str, datasets.Dataset]:
    docs = _documents(tokenizer, metadata, parse_options(metadata).max_tokens)
    rows = [{"name": d["name"], "text": d["text"], "tokens": len(d["ids"])} for d in docs]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def rolling_process_results(doc: Mapping[str, Any], results: Sequence[float]) -> dict[str, tuple[float, int]]:
    """lm-eval's word and byte perplexities and bits per byte (aggregations ``weighted_perplexity``
    and ``bits_per_byte``: totals over all documents), of the text as scored."""
    (loglikelihood,) = results
    words = len(doc["text"].split())
    size = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, size),
        "bits_per_byte": (loglikelihood, size),
    }


# --------------------------------------------------------------------------------------- position


def bucket_name(start: int, end: int) -> str:
    return f"ppl@{start}-{end}"


def buckets(tokenizer: Tokenizer, ids: Sequence[int], edges: Sequence[int]) -> list[dict[str, Any]]:
    """The position buckets of a document of tokens ``ids``: for each bucket ``[a, b)`` of
    ``edges`` that the document reaches, its ``context`` (the text of tokens ``[0, start)``),
    ``continuation`` (tokens ``[start, end)``), ``start``, ``end`` and ``tokens`` (``end - start``).
    The first bucket starts at token 1 (token 0 is its context); an inner edge whose prefix text
    ends in whitespace moves forward to the next token. The first context and all continuations
    concatenate to the document, and every token but the first is in exactly one bucket."""
    n = len(ids)
    text = _decode(tokenizer, ids)

    def prefix(position: int) -> str:
        return text if position >= n else _decode(tokenizer, ids[:position])

    def boundary(position: int) -> tuple[int, str]:
        while position < n:
            head = prefix(position)
            if head and text.startswith(head) and head == head.rstrip():
                return position, head
            position += 1
        return n, text

    spans: list[dict[str, Any]] = []
    start, context = boundary(1)
    for lo, hi in itertools.pairwise(edges):
        if lo >= n or start >= n:
            break
        end, head = boundary(hi) if hi < n else (n, text)
        if end > start:
            spans.append(
                {
                    "name": bucket_name(lo, hi),
                    "context": context,
                    "continuation": head[len(context) :],
                    "start": start,
                    "end": end,
                    "tokens": end - start,
                }
            )
            start, context = end, head
    return spans


def position_dataset(tokenizer: Tokenizer | None = None, **metadata: Any) -> dict[str, datasets.Dataset]:
    options = parse_options(metadata)
    max_tokens = min(options.max_tokens, options.bucket_edges[-1])
    tok = resolve_tokenizer(metadata, tokenizer, GROUP)
    docs = _documents(tok, metadata, max_tokens)
    limit = model_max_length(metadata, tok)
    longest = max(len(d["ids"]) for d in docs)
    if limit is not None and longest > limit:
        raise _error(
            "ppl_max_tokens",
            f"({options.max_tokens}): a document has {longest} tokens, more than the model's max_length "
            f"{limit}; lm-eval would cut the start of the prefix (a window reset). Pass --model_args "
            f"...,max_length={longest} (or more), or lower ppl_max_tokens",
        )
    rows = [
        {"name": d["name"], "text": d["text"], "buckets": buckets(tok, d["ids"], options.bucket_edges)}
        for d in docs
    ]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def token_perplexity(items: Sequence[tuple[float, int]]) -> float:
    """exp(total negative log-likelihood / total tokens) of ``(loglikelihood, tokens)`` items."""
    total_ll = sum(ll for ll, _ in items)
    total_tokens = sum(count for _, count in items)
    return math.exp(-total_ll / total_tokens) if total_tokens else math.nan


def position_process_results(doc: Mapping[str, Any], results: Sequence[Any]) -> dict[str, tuple[float, int]]:
    """``ppl@a-b``: the bucket's ``(loglikelihood, tokens)``; ``ppl``: the document's totals."""
    scores: dict[str, tuple[float, int]] = {}
    for bucket, result in zip(doc["buckets"], results, strict=True):
        ll = float(result[0] if isinstance(result, tuple | list) else result)
        scores[bucket["name"]] = (ll, bucket["tokens"])
    scores["ppl"] = (sum(ll for ll, _ in scores.values()), sum(t for _, t in scores.values()))
    return scores


class _PerplexityAggregations(dict):
    """``token_perplexity`` for every ``ppl`` key, whatever the bucket edges."""

    def __missing__(self, key: str) -> Any:
        if key == "ppl" or key.startswith("ppl@"):
            return token_perplexity
        raise KeyError(key)


class _LowerIsBetter(dict):
    def __missing__(self, key: str) -> bool:
        return False


class PositionPerplexityTask(ConfigurableTask):
    """``ttt_ppl_position``: one ``loglikelihood`` request per bucket of a document (lm-eval's
    YAML ``loglikelihood`` output makes one request per document, hence this class), and the
    per-bucket ``token_perplexity`` aggregation for bucket keys that depend on the options."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config)

    def construct_requests(self, doc: dict[str, Any], ctx: str, **kwargs: Any) -> list[Instance]:
        kwargs.pop("apply_chat_template", None)
        kwargs.pop("chat_template", None)
        return [
            Instance(
                request_type="loglikelihood",
                doc=doc,
                arguments=(bucket["context"], bucket["continuation"]),
                idx=i,
                **kwargs,
            )
            for i, bucket in enumerate(doc["buckets"])
        ]

    def process_results(self, doc: dict[str, Any], results: Sequence[Any]) -> dict[str, tuple[float, int]]:
        return position_process_results(doc, results)

    def aggregation(self) -> dict[str, Any]:
        return _PerplexityAggregations(super().aggregation())

    def higher_is_better(self) -> dict[str, bool]:
        return _LowerIsBetter(super().higher_is_better())
