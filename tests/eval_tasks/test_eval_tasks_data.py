"""The ``ttt_ppl`` group (``eval_tasks/perplexity.py``: rolling perplexity, perplexity per position
bucket) and the ``ttt_recall_data`` group (``eval_tasks/recall_data.py``: SWDE, FDA,
SQuAD-completion and their JRT "twice" variants, one config shared through ``include:``) on small
generated local files: data loading, prompts, bucket construction, aggregation, the ``contains``
metric, clear errors for bad options, and one run of the real ``lm_eval`` command line over all of
them on a tiny TTT checkpoint, whose per-bucket perplexities match one direct pass of the model over
each whole document."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from eval_models import MODEL_KINDS, character_tokenizer, run_lm_eval, save_checkpoint, tiny_model
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from ttt_mixer.eval_tasks import perplexity, recall_data, tasks_path

TOKENIZER = character_tokenizer()
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "far", "away", "from", "home"]
EDGES = [0, 64, 128, 256, 512]


def write_documents(folder: Path, count: int = 3) -> list[Path]:
    """Text files of random words, with newlines and double spaces (whitespace at bucket edges)."""
    rng = random.Random(0)
    paths = []
    for i in range(count):
        words = [rng.choice(WORDS) + rng.choice(["", "", " ", "\n"]) for _ in range(60 + 45 * i)]
        path = folder / f"doc{i}.txt"
        path.write_text(" ".join(words))
        paths.append(path)
    return paths


def ids_of(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False).input_ids


def position_docs(folder: Path, **metadata) -> list[dict]:
    metadata = {"ppl_files": str(folder / "doc*.txt"), "ppl_bucket_edges": EDGES, **metadata}
    return perplexity.position_dataset(tokenizer=TOKENIZER, **metadata)["test"].to_list()


# ------------------------------------------------------------------------------------- perplexity


def test_documents_load_from_files_and_truncate_to_max_tokens(tmp_path: Path) -> None:
    paths = write_documents(tmp_path)
    docs = perplexity.rolling_dataset(
        tokenizer=TOKENIZER, ppl_files=[str(paths[2]), str(tmp_path / "doc[01].txt")], ppl_max_tokens=300
    )["test"].to_list()
    assert [d["name"] for d in docs] == [str(paths[2]), str(paths[0]), str(paths[1])]
    for doc, path in zip(docs, [paths[2], paths[0], paths[1]], strict=True):
        full = path.read_text().strip()
        assert full.startswith(doc["text"]) and doc["tokens"] == len(ids_of(doc["text"])) <= 300
        assert doc["text"] == full or doc["tokens"] == 300


def test_rolling_results_count_words_and_bytes() -> None:
    doc = {"text": "héllo  world\nagain"}
    assert perplexity.rolling_process_results(doc, [-12.5]) == {
        "word_perplexity": (-12.5, 3),
        "byte_perplexity": (-12.5, 19),
        "bits_per_byte": (-12.5, 19),
    }


def test_buckets_tile_the_document_in_token_positions(tmp_path: Path) -> None:
    write_documents(tmp_path)
    docs = position_docs(tmp_path, ppl_max_tokens=400)
    assert len(docs) == 3
    for doc in docs:
        ids = ids_of(doc["text"])
        buckets = doc["buckets"]
        # the first context and the continuations concatenate to the document
        assert buckets[0]["context"] + "".join(b["continuation"] for b in buckets) == doc["text"]
        # every token but the first in exactly one bucket, in order
        assert [b["end"] for b in buckets[:-1]] == [b["start"] for b in buckets[1:]]
        assert buckets[-1]["end"] == len(ids) <= 400
        for bucket, (lo, hi) in zip(buckets, itertools.pairwise(EDGES), strict=False):
            assert bucket["name"] == f"ppl@{lo}-{hi}"
            assert bucket["context"] == doc["text"][: bucket["start"]]  # the whole prefix
            assert bucket["context"] == bucket["context"].rstrip()  # lm-eval moves no whitespace
            assert len(ids_of(bucket["continuation"])) == bucket["tokens"] == bucket["end"] - bucket["start"]
            # an edge moves forward only past prefixes that end in whitespace
            first = max(lo, 1)
            assert first <= bucket["start"] and doc["text"][first - 1 : bucket["start"] - 1].strip() == ""
    # documents of ~290, 400 (cut) and 400 (cut) characters: all four buckets, the last one partial
    assert [len(d["buckets"]) for d in docs] == [4, 4, 4]
    assert [len(ids_of(d["text"])) for d in docs][1:] == [400, 400]


def test_whitespace_at_an_edge_moves_it_forward() -> None:
    ids = ids_of("ab  \n cd")
    buckets = perplexity.buckets(TOKENIZER, ids, [0, 3, 8])
    assert [(b["start"], b["end"]) for b in buckets] == [(1, 7), (7, 8)]
    assert [b["context"] for b in buckets] == ["a", "ab  \n c"]
    assert [b["continuation"] for b in buckets] == ["b  \n c", "d"]


def test_position_aggregation_is_total_nll_over_total_tokens() -> None:
    doc = {"buckets": [{"name": "ppl@0-4", "tokens": 3}, {"name": "ppl@4-8", "tokens": 4}]}
    other = {"buckets": [{"name": "ppl@0-4", "tokens": 3}]}
    scores = [
        perplexity.position_process_results(doc, [(-6.0, False), (-2.0, True)]),
        perplexity.position_process_results(other, [(-9.0, False)]),
    ]
    assert scores[0] == {"ppl@0-4": (-6.0, 3), "ppl@4-8": (-2.0, 4), "ppl": (-8.0, 7)}
    first = perplexity.token_perplexity([s["ppl@0-4"] for s in scores])
    assert first == pytest.approx(math.exp(15 / 6))  # not the mean of exp(2) and exp(3)
    assert perplexity.token_perplexity([s["ppl"] for s in scores]) == pytest.approx(math.exp(17 / 10))
    task_aggregations = perplexity._PerplexityAggregations({})
    assert task_aggregations["ppl@8192-16384"] is perplexity.token_perplexity


@pytest.mark.parametrize(
    ("metadata", "option"),
    [
        ({"ppl_bucket_edges": [0]}, "ppl_bucket_edges"),
        ({"ppl_bucket_edges": [0, 512, 256]}, "ppl_bucket_edges"),
        ({"ppl_bucket_edges": [1, 512]}, "ppl_bucket_edges"),
        ({"ppl_max_tokens": 0}, "ppl_max_tokens"),
        ({"ppl_files": []}, "ppl_files"),
        ({"ppl_files": "no-such-*.txt"}, "ppl_files"),
        ({"ppl_bucket_edge": [0, 1]}, "ppl_bucket_edge"),
        ({"max_length": 100}, "ppl_max_tokens"),  # longer documents than the model reads
    ],
)
def test_bad_perplexity_options_raise_naming_the_option(tmp_path: Path, metadata: dict, option: str) -> None:
    write_documents(tmp_path)
    with pytest.raises(ValueError, match=f"'{option}'"):
        position_docs(tmp_path, **metadata)


def test_a_tokenizer_is_required() -> None:
    with pytest.raises(ValueError, match="'tokenizer'"):
        perplexity.rolling_dataset(ppl_files="*.txt")


# ---------------------------------------------------------------------------------- recall data

SWDE_ROWS = [
    {
        "text": "<html> Title: The Old Tree Year: 1999 </html>\nSummary of information above...\nyear:",
        "key": "year",
        "value": " 1999 ",
    },
    {
        "text": "<html> Title: Far Away Director: Ann Lee </html> director:",
        "key": "director",
        "value": "Ann Lee",
    },
]
FDA_ROWS = [
    {
        "text": "510(k) number: K123456. Device name: Cat Mat.\ndevice name:",
        "key": "device name",
        "value": "Cat Mat",
    },
    {"text": "Applicant: Home Inc. Product code: ABC.", "key": "product code", "value": "ABC"},
]
SQUAD_ROWS = [
    {
        "text": "The tree is old. The tree is in the park. The tree stands in the",
        "value": "park",
        "context": "The tree is old. The tree is in the park. Question: Where is the tree?",
        "question": "Where is the tree?",
    },
    {
        "text": "The cat sat on a mat. The cat sat on a",
        "value": "mat",
        "context": "The cat sat on a mat.",
        "question": "Where did the cat sit?",
    },
]


def write_recall_files(folder: Path) -> dict[str, str]:
    files = {}
    for name, rows in (("swde", SWDE_ROWS), ("fda", FDA_ROWS), ("squad_completion", SQUAD_ROWS)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files[name] = str(path)
    return files


RECALL_ROWS = {"swde": SWDE_ROWS, "fda": FDA_ROWS, "squad_completion": SQUAD_ROWS}


def recall_config(task: str) -> dict:
    """A ``ttt_recall_data`` task's YAML as lm-eval reads it: includes merged, functions imported."""
    return load_yaml(Path(tasks_path()) / f"ttt_{task}.yaml")


def recall_task(task: str, files) -> ConfigurableTask:
    """The task lm-eval builds from that YAML, reading ``files`` (the ``recall_data_files`` option)."""
    config = recall_config(task)
    config["metadata"] = {**config["metadata"], "recall_data_files": files}
    return ConfigurableTask(config=config)


def test_recall_yamls_share_one_config() -> None:
    # fda and squad_completion are ttt_swde on other data (squad: and its own prompt); each twice
    # variant is its plain task with another prompt
    base = recall_config("swde")
    changes = {
        "fda": {"task", "dataset_kwargs"},
        "squad_completion": {"task", "dataset_kwargs", "doc_to_text"},
        **{f"{name}_twice": {"task", "doc_to_text"} for name in RECALL_ROWS},
    }
    for task, changed in changes.items():
        config = recall_config(task)
        plain = recall_config(task.removesuffix("_twice")) if task.endswith("_twice") else base
        assert config.keys() == plain.keys()
        assert {k for k in config if config[k] != plain[k]} == changed, task
        assert config["task"] == f"ttt_{task}"
        assert config["dataset_kwargs"] == {"dataset": task.removesuffix("_twice")}


@pytest.mark.parametrize("name", list(RECALL_ROWS))
def test_recall_data_loads_local_files_and_twice_repeats_the_context(tmp_path: Path, name: str) -> None:
    files = write_recall_files(tmp_path)
    once, twice = recall_task(name, files), recall_task(f"{name}_twice", files)
    rows = RECALL_ROWS[name]
    once_docs, twice_docs = list(once.validation_docs()), list(twice.validation_docs())
    assert len(once_docs) == len(twice_docs) == len(rows)
    for row, a, b in zip(rows, once_docs, twice_docs, strict=True):
        assert a["answers"] == b["answers"] == [row["value"].strip()]
        assert once.doc_to_target(a) == twice.doc_to_target(b) == row["value"].strip()
        prompt, prompt_twice = once.doc_to_text(a), twice.doc_to_text(b)
        if name == "squad_completion":
            assert prompt == row["text"]
            context = row["context"].split("Question:")[0]
            assert prompt_twice == f"{row['question']} {context}\n{row['text']}"
            continue
        key = row["key"][0].upper() + row["key"][1:]
        assert prompt.endswith(f". {key}:")
        assert not prompt[: -len(key) - 1].rstrip(" .").lower().endswith(row["key"] + ":")
        assert "Summary of information" not in prompt
        document = prompt[: -len(f" {key}:")]
        assert prompt_twice == f"Information about {key}. {document}\n{document} {key}:"
        assert prompt_twice.count(document) == 2
    assert once.config.generation_kwargs == {"until": ["\n"], "max_gen_toks": 48, "do_sample": False}


def test_contains_ignores_case_and_reads_any_answer() -> None:
    assert recall_data.process_results({"answers": ["Ann Lee"]}, [" ann lee, 1999"]) == {"contains": 1.0}
    assert recall_data.process_results({"answers": ["Ann Lee"]}, [" Ann"]) == {"contains": 0.0}
    assert recall_data.contains("a (b) c", ["(B)"]) == 1.0  # literal, not a pattern
    assert recall_data.contains("x", ["y", "X"]) == 1.0


@pytest.mark.parametrize(
    ("task", "files"),
    [
        ("swde", {"swdee": "swde"}),  # no such dataset
        ("swde", "swde"),  # not a mapping
        ("swde", {"swde": "missing"}),  # no such file
        ("swde", {"swde": "squad_completion"}),  # no key column
        ("squad_completion_twice", {"squad_completion": "swde"}),  # no context and question columns
    ],
)
def test_bad_recall_data_files_raise_naming_the_option(tmp_path: Path, task: str, files) -> None:
    write_recall_files(tmp_path)
    if isinstance(files, dict):
        files = {name: str(tmp_path / f"{stem}.jsonl") for name, stem in files.items()}
    with pytest.raises(ValueError, match="'recall_data_files'"):
        built = recall_task(task, files)
        built.doc_to_text(next(iter(built.validation_docs())))  # the twice prompt reads its columns


def test_unknown_recall_data_option_or_dataset_is_rejected() -> None:
    with pytest.raises(ValueError, match="'recall_data_file'"):
        recall_data.recall_dataset("swde", recall_data_file={})
    with pytest.raises(ValueError, match="'swdee'"):
        recall_data.recall_dataset("swdee")


# -------------------------------------------------------------------------------- lm_eval end to end


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_lm_eval_command_line_scores_perplexity_and_real_data_recall(tmp_path: Path, kind: str) -> None:
    model = tiny_model(kind, TOKENIZER)
    checkpoint = save_checkpoint(model, TOKENIZER, tmp_path / kind)
    write_documents(tmp_path)
    metadata = {
        "recall_data_files": write_recall_files(tmp_path),
        "ppl_files": str(tmp_path / "doc*.txt"),
        "ppl_bucket_edges": EDGES,
        "ppl_max_tokens": 400,
    }
    args = [
        *("--model", "hf", "--model_args", f"pretrained={checkpoint},trust_remote_code=True"),
        *("--tasks", "ttt_recall_data,ttt_ppl", "--include_path", tasks_path()),
        *("--metadata", json.dumps(metadata), "--limit", "2", "--device", "cpu", "--batch_size", "4"),
        # 4 generated tokens, not 48: a tiny model's answers are noise anyway, and CPU decoding is slow
        *("--gen_kwargs", "max_gen_toks=4"),
    ]
    results = json.loads(run_lm_eval(args, tmp_path).read_text())["results"]
    for name in ("swde", "fda", "squad_completion"):
        for task in (f"ttt_{name}", f"ttt_{name}_twice"):
            assert 0.0 <= results[task]["contains,none"] <= 1.0, (task, results[task])
    for metric in ("word_perplexity", "byte_perplexity"):
        assert 1.0 < results["ttt_ppl_rolling"][f"{metric},none"] < math.inf
    assert 0.0 < results["ttt_ppl_rolling"]["bits_per_byte,none"] < math.inf

    # ttt_ppl_position against one pass of the model over each whole document (the first two)
    docs = position_docs(tmp_path, ppl_max_tokens=400)[:2]
    totals: dict[str, list[float]] = {}
    for doc in docs:
        ids = torch.tensor([ids_of(doc["text"])])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)
        token_ll = logprobs.gather(1, ids[0, 1:, None])[:, 0]  # token_ll[t - 1]: log p(token t)
        for bucket in doc["buckets"]:
            ll = token_ll[bucket["start"] - 1 : bucket["end"] - 1].sum().item()
            for key in (bucket["name"], "ppl"):
                total = totals.setdefault(key, [0.0, 0])
                total[0] -= ll
                total[1] += bucket["tokens"]
    position = results["ttt_ppl_position"]
    assert {f"{k},none" for k in totals} <= set(position) and len(totals) >= 4
    for key, (nll, tokens) in totals.items():
        got = position[f"{key},none"]
        assert 1.0 < got < math.inf
        assert got == pytest.approx(math.exp(nll / tokens), rel=1e-3), key
