"""Real-data recall tasks of the ``ttt_recall_data`` group, from the Based and Just-read-twice (JRT)
papers: ``ttt_swde``, ``ttt_fda``, ``ttt_squad_completion`` and their JRT-prompt variants
``ttt_swde_twice``, ``ttt_fda_twice``, ``ttt_squad_completion_twice`` (the context read twice
before the question).

Configs: ``ttt_swde.yaml`` holds the whole task (data from ``recall_dataset``, greedy generation up
to a newline, 48 tokens, metric ``contains``); ``ttt_fda.yaml`` and ``ttt_squad_completion.yaml``
``include:`` it and change the dataset (``dataset_kwargs``) and, for SQuAD, the prompt; each
``_twice`` YAML includes its plain task and changes only the prompt (``doc_to_text``).

Data: the ``validation`` split of the public datasets that lm-eval's own ``swde``, ``fda`` and
``squad_completion`` tasks read (``DATASETS``), or a local JSON/JSONL file of the same columns named
by the ``recall_data_files`` option, a mapping from dataset (``swde``, ``fda``, ``squad_completion``)
to path: ``--metadata '{"recall_data_files": {"swde": "swde.jsonl"}}'``. Columns: ``text`` (the
document, ending with the question), ``value`` (the answer), and ``key`` (SWDE and FDA: the
attribute asked for) or ``context`` and ``question`` (SQuAD, read by the twice prompt only).

Prompts follow the JRT paper's harness (HazyResearch/prefix-linear-attention): SWDE and FDA keep
the document (SWDE's text up to ``Summary of information above...``), drop a trailing ``key:``, end
it with a period and ask ``Key:``; the twice variant writes ``Information about Key. `` then the
document twice (newline between) and the question. SQuAD keeps ``text`` (stripped); its twice
variant puts the question and the context (before ``Question:``) first, then ``text``. Greedy
generation up to a newline (48 tokens); metric ``contains``: the stripped answer occurs in the
generation, ignoring case, as in lm-eval's tasks.

How this differs from lm-eval's stock ``swde``, ``fda`` and ``squad_completion`` (lm-eval 0.4.13:
same datasets and split, same ``contains`` metric), and why nothing here is built on them:

- The stock tasks cannot be configured from YAML. Each is a Python class (``swde.yaml`` is just
  ``task: swde`` and ``class: !function task.SWDE``) whose ``__init__`` takes no ``config``: lm-eval
  builds it as ``SWDE()``, and it hands ``ConfigurableTask`` only its version. A YAML that
  ``include:``s ``swde.yaml`` therefore changes the task's name and nothing else: not the prompt
  (``doc_to_text`` is a method), not the data (the hub id is the class's ``DATASET_PATH``; no local
  files, so no ``recall_data_files`` and no offline tests), and for SWDE and FDA not the generation
  (``construct_requests`` fixes it, ignoring ``--gen_kwargs``). An ``include:`` of theirs would also
  have to name lm-eval's installed folder: a relative path resolves against the including YAML's
  folder.
- ``ttt_swde`` and ``ttt_fda`` ask with the JRT prompt above; stock ``swde`` and ``fda`` send the
  dataset's ``text`` as it is (stripped), the Based harness's prompt: SWDE's ``Summary of
  information above...`` section kept, the question as the dataset writes it (``key:``) rather than
  ``Key:`` after a period. The JRT paper scores its twice prompt against this default, and the two
  differ only in the repetition.
- ``ttt_squad_completion`` has stock ``squad_completion``'s prompt, target and metric, but not its
  generation: the stock class reads its config's ``generation_kwargs``, which its empty config fills
  with lm-eval's defaults (up to ``\\n\\n``, 256 tokens), so its generations run past the answer's
  line; ours stop at the newline after at most 48 tokens, as the Based and JRT harnesses do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from .options import task_options

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
TWICE_COLUMNS = ("context", "question")  # SQuAD's twice prompt
GROUP = "ttt_recall_data"  # its options: the group's row of options.OPTION_GROUPS
SWDE_SUMMARY = "Summary of information above..."


def data_files(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The ``recall_data_files`` option: dataset name -> local file; ValueError naming it."""
    files = task_options(metadata, GROUP)["recall_data_files"] or {}
    if not isinstance(files, Mapping) or not all(
        name in DATASETS and isinstance(path, str) and path for name, path in files.items()
    ):
        raise ValueError(
            "ttt_recall_data option 'recall_data_files' must map dataset names "
            f"({', '.join(DATASETS)}) to local JSON/JSONL files, got {files!r}"
        )
    return dict(files)


def _missing(name: str, missing: Sequence[str], has: Sequence[str]) -> ValueError:
    return ValueError(
        f"ttt_recall_data option 'recall_data_files': {name} data lacks the columns {list(missing)} "
        f"(has {list(has)})"
    )


def load_rows(name: str, metadata: Mapping[str, Any]) -> datasets.Dataset:
    """The dataset's rows: the local file of ``recall_data_files`` if given, else the hub's."""
    path = data_files(metadata).get(name)
    if path is None:
        data = datasets.load_dataset(DATASETS[name], split=SPLIT)
    else:
        if not Path(path).is_file():
            raise ValueError(f"ttt_recall_data option 'recall_data_files': no file {path!r} for {name}")
        data = datasets.load_dataset("json", data_files={SPLIT: path}, split=SPLIT)
    missing = [c for c in COLUMNS[name] if c not in data.column_names]
    if missing:
        raise _missing(name, missing, data.column_names)
    return data


def _answers(value: Any) -> list[str]:
    values = value if isinstance(value, list | tuple) else [value]
    return [str(v).strip() for v in values if str(v).strip()]


def recall_dataset(dataset: str, **metadata: Any) -> dict[str, datasets.Dataset]:
    """lm-eval's ``custom_dataset`` of every task here: ``dataset`` (from the YAML's
    ``dataset_kwargs``) names the data; the rows gain ``answers``, the stripped answers."""
    if dataset not in DATASETS:
        raise ValueError(f"ttt_recall_data: no dataset {dataset!r}; the datasets are {', '.join(DATASETS)}")
    rows = load_rows(dataset, metadata)
    answers = [_answers(value) for value in rows["value"]]
    return {SPLIT: rows.add_column("answers", answers)}


# ------------------------------------------------------------------------------------------ prompts


def _document_and_question(doc: Mapping[str, Any]) -> tuple[str, str]:
    """SWDE/FDA: the document without the trailing question, and the question ``Key:``."""
    text, key = doc["text"].split(SWDE_SUMMARY)[0], doc["key"]
    question = key + ":"
    while question.strip() and text.rstrip().lower().endswith(question.lower()):
        text = text.rstrip()[: -len(question)]
    document = text.strip().strip(".").strip()
    return document + ".", key[:1].upper() + key[1:] + ":"


def extraction_prompt(doc: Mapping[str, Any]) -> str:
    """``ttt_swde``/``ttt_fda``: ``document. Key:``."""
    return " ".join(_document_and_question(doc))


def extraction_twice_prompt(doc: Mapping[str, Any]) -> str:
    """``ttt_swde_twice``/``ttt_fda_twice``: ``Information about Key. document\\ndocument Key:``."""
    document, question = _document_and_question(doc)
    return f"Information about {question[:-1]}. {document}\n{document} {question}"


def squad_twice_prompt(doc: Mapping[str, Any]) -> str:
    """``ttt_squad_completion_twice``: the question and the context, then the text."""
    missing = [c for c in TWICE_COLUMNS if doc.get(c) is None]
    if missing:
        raise _missing("squad_completion", missing, list(doc))
    return f"{doc['question']} {doc['context'].split('Question:')[0]}\n{doc['text'].strip()}"


# ------------------------------------------------------------------------------------------ scoring


def contains(generation: str, answers: Sequence[str]) -> float:
    """1 if any answer occurs in the generation, ignoring case (lm-eval's ``contains_score``)."""
    return float(any(re.search(re.escape(a), generation, re.IGNORECASE) for a in answers if a))


def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    return {"contains": contains(results[0], doc["answers"])}
