"""Real-data recall tasks of the ``ttt_recall_data`` group, from the Based and Just-read-twice (JRT)
papers: ``ttt_swde``, ``ttt_fda``, ``ttt_squad_completion`` and their JRT-prompt variants
``ttt_swde_twice``, ``ttt_fda_twice``, ``ttt_squad_completion_twice`` (the context read twice
before the question).

Data: the ``validation`` split of the public datasets that lm-eval's own ``swde``, ``fda`` and
``squad_completion`` tasks read (``DATASETS``), or a local JSON/JSONL file of the same columns named
by the ``recall_data_files`` option, a mapping from dataset (``swde``, ``fda``, ``squad_completion``)
to path: ``--metadata '{"recall_data_files": {"swde": "swde.jsonl"}}'``. Columns: ``text`` (the
document, ending with the question), ``value`` (the answer), and ``key`` (SWDE and FDA: the
attribute asked for) or ``context`` and ``question`` (SQuAD, for the twice variant).

Prompts follow the JRT paper's harness (HazyResearch/prefix-linear-attention): SWDE and FDA keep
the document (SWDE's text up to ``Summary of information above...``), drop a trailing ``key:``, end
it with a period and ask ``Key:``; the twice variant writes ``Information about Key. `` then the
document twice (newline between) and the question. SQuAD keeps ``text``; its twice variant puts the
question and the context (before ``Question:``) first, then ``text``. Greedy generation up to a
newline (48 tokens); metric ``contains``: the answer occurs in the generation, ignoring case, as in
lm-eval's tasks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from .recall import task_options

DATASETS = {
    "swde": "hazyresearch/based-swde-v2",
    "fda": "hazyresearch/based-fda",
    "squad_completion": "hazyresearch/based-squad",
}
SPLIT = "validation"
COLUMNS = {
    "swde": ("text", "key", "value"),
    "fda": ("text", "key", "value"),
    "squad_completion": ("text", "value"),
}
TWICE_COLUMNS = {"squad_completion": ("context", "question")}
OPTION_DEFAULTS: dict[str, Any] = {"recall_data_files": {}}
OPTION_PREFIX = "recall_data"
SWDE_SUMMARY = "Summary of information above..."


def data_files(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The ``recall_data_files`` option: dataset name -> local file; ValueError naming it."""
    files = (
        task_options(metadata, OPTION_DEFAULTS, OPTION_PREFIX, "ttt_recall_data")["recall_data_files"] or {}
    )
    if not isinstance(files, Mapping) or not all(
        name in DATASETS and isinstance(path, str) and path for name, path in files.items()
    ):
        raise ValueError(
            "ttt_recall_data option 'recall_data_files' must map dataset names "
            f"({', '.join(DATASETS)}) to local JSON/JSONL files, got {files!r}"
        )
    return dict(files)


def load_rows(name: str, metadata: Mapping[str, Any], twice: bool) -> datasets.Dataset:
    """The dataset's rows: the local file of ``recall_data_files`` if given, else the hub's."""
    path = data_files(metadata).get(name)
    if path is None:
        data = datasets.load_dataset(DATASETS[name], split=SPLIT)
    else:
        if not Path(path).is_file():
            raise ValueError(f"ttt_recall_data option 'recall_data_files': no file {path!r} for {name}")
        data = datasets.load_dataset("json", data_files={SPLIT: path}, split=SPLIT)
    needed = COLUMNS[name] + (TWICE_COLUMNS.get(name, ()) if twice else ())
    missing = [c for c in needed if c not in data.column_names]
    if missing:
        raise ValueError(
            f"ttt_recall_data option 'recall_data_files': {name} data lacks the columns {missing} "
            f"(has {data.column_names})"
        )
    return data


# ------------------------------------------------------------------------------------------ prompts


def _document_and_question(text: str, key: str) -> tuple[str, str]:
    """SWDE/FDA: the document without the trailing question, and the question ``Key:``."""
    text = text.split(SWDE_SUMMARY)[0]
    question = key + ":"
    while question.strip() and text.rstrip().lower().endswith(question.lower()):
        text = text.rstrip()[: -len(question)]
    document = text.strip().strip(".").strip()
    return document + ".", key[:1].upper() + key[1:] + ":"


def extraction_prompt(text: str, key: str, twice: bool) -> str:
    document, question = _document_and_question(text, key)
    if not twice:
        return f"{document} {question}"
    return f"Information about {question[:-1]}. {document}\n{document} {question}"


def squad_prompt(text: str, context: str | None, question: str | None, twice: bool) -> str:
    if not twice:
        return text.strip()
    return f"{question} {context.split('Question:')[0]}\n{text.strip()}"


def _answers(value: Any) -> list[str]:
    values = value if isinstance(value, list | tuple) else [value]
    return [str(v).strip() for v in values if str(v).strip()]


def _dataset(name: str, twice: bool, metadata: Mapping[str, Any]) -> dict[str, datasets.Dataset]:
    rows = []
    for row in load_rows(name, metadata, twice):
        if name == "squad_completion":
            prompt = squad_prompt(row["text"], row.get("context"), row.get("question"), twice)
        else:
            prompt = extraction_prompt(row["text"], row["key"], twice)
        rows.append({"prompt": prompt, "answers": _answers(row["value"])})
    return {SPLIT: datasets.Dataset.from_list(rows, split=datasets.Split.VALIDATION)}


def swde_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("swde", False, metadata)


def swde_twice_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("swde", True, metadata)


def fda_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("fda", False, metadata)


def fda_twice_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("fda", True, metadata)


def squad_completion_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("squad_completion", False, metadata)


def squad_completion_twice_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("squad_completion", True, metadata)


# ------------------------------------------------------------------------------------------ scoring


def contains(generation: str, answers: Sequence[str]) -> float:
    """1 if any answer occurs in the generation, ignoring case (lm-eval's ``contains_score``)."""
    return float(any(re.search(re.escape(a), generation, re.IGNORECASE) for a in answers if a))


def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    return {"contains": contains(results[0], doc["answers"])}
