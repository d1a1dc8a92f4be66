"""Set disjointness (``eval_tasks/set_disjointness.py``): deterministic documents of two sets sharing
exactly one element, at the requested sizes and order, the JRT variant the same sets given twice,
scoring at chance for noise and 1 for an oracle, bad options named, and ``ttt-mixer eval`` running
both tasks on a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from eval_models import character_tokenizer, run_lm_eval, save_checkpoint, tiny_model

from ttt_mixer.eval_tasks import recall
from ttt_mixer.eval_tasks.set_disjointness import (
    SYMBOLS,
    set_disjointness_dataset,
    set_disjointness_twice_dataset,
    set_sizes,
)

TOKENIZER = character_tokenizer()


def documents(build, **metadata) -> list[dict]:
    return build(tokenizer=TOKENIZER, **metadata)["test"].to_list()


def split_sets(context: str) -> list[list[str]]:
    """The sets of a context ``A | B =`` or ``A | B | A | B =``, in order."""
    return [part.split() for part in context.removesuffix(" =").split(" | ")]


@pytest.mark.parametrize("fraction", [0.25, 0.75])
def test_documents_hold_two_sets_sharing_one_element_at_the_requested_sizes(fraction: float) -> None:
    metadata = {"sd_lengths": [8, 20], "num_samples": 30, "sd_first_fraction": fraction}
    docs = documents(set_disjointness_dataset, **metadata)
    assert docs == documents(set_disjointness_dataset, **metadata)
    assert [doc["length"] for doc in docs[:4]] == [8, 20, 8, 20]  # interleaved across lengths
    for doc in docs:
        first, second = split_sets(doc["context"])
        assert (len(first), len(second)) == set_sizes(doc["length"], fraction)
        assert len(set(first)) == len(first) and len(set(second)) == len(second)
        assert set(first) & set(second) == {doc["choices"][doc["gold"]]}
        assert sorted(set(first) | set(second)) == doc["choices"]
        assert set(doc["choices"]) <= set(SYMBOLS)
    # the shared element is drawn, not placed: it sits anywhere in the first set
    positions = {split_sets(doc["context"])[0].index(doc["choices"][doc["gold"]]) for doc in docs}
    assert len(positions) > 2
    assert set_sizes(8, 0.25) == (2, 6) and set_sizes(8, 0.75) == (6, 2) and set_sizes(3, 0.01) == (1, 2)


def test_the_twice_variant_gives_the_same_sets_twice() -> None:
    metadata = {"sd_lengths": [12], "num_samples": 5}
    once = documents(set_disjointness_dataset, **metadata)
    twice = documents(set_disjointness_twice_dataset, **metadata)
    for doc, doc_twice in zip(once, twice, strict=True):
        sets = split_sets(doc["context"])
        assert split_sets(doc_twice["context"]) == sets + sets
        assert {k: v for k, v in doc.items() if k != "context"} == {
            k: v for k, v in doc_twice.items() if k != "context"
        }


def test_scoring_puts_noise_at_chance_and_an_oracle_at_one() -> None:
    docs = documents(set_disjointness_dataset, sd_lengths=[8], num_samples=400)
    rng = np.random.default_rng(0)
    noise = [
        recall.mqar_process_results(doc, [(float(rng.normal()), False) for _ in doc["choices"]])
        for doc in docs
    ]
    assert np.mean([score["acc@8"] for score in noise]) == pytest.approx(1 / 7, abs=0.05)
    oracle = [
        recall.mqar_process_results(
            doc, [(0.0 if i == doc["gold"] else -1.0, i == doc["gold"]) for i in range(len(doc["choices"]))]
        )
        for doc in docs
    ]
    assert {value for score in oracle for value in score.values()} == {1.0}


@pytest.mark.parametrize(
    ("metadata", "option"),
    [
        ({"sd_lengths": [2]}, "sd_lengths"),
        ({"sd_lengths": [1000]}, "sd_lengths"),
        ({"sd_lengths": []}, "sd_lengths"),
        ({"sd_first_fraction": 1.0}, "sd_first_fraction"),
        ({"sd_first_fraction": True}, "sd_first_fraction"),
        ({"sd_length": [8]}, "sd_length"),
        ({"num_samples": 0}, "num_samples"),
        ({"sd_lengths": [64], "max_length": 40}, "sd_lengths"),
    ],
)
def test_bad_options_raise_naming_the_option(metadata: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option):
        set_disjointness_dataset(tokenizer=TOKENIZER, **metadata)


@pytest.mark.slow
def test_ttt_mixer_eval_scores_both_tasks_per_length(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tiny_model("ttt", TOKENIZER), TOKENIZER, tmp_path / "tiny-ttt")
    metadata = {"sd_lengths": [6, 10], "num_samples": 2, "sd_first_fraction": 0.75}
    args = [
        *("--model", "hf", "--model_args", f"pretrained={checkpoint}"),
        *("--tasks", "ttt_set_disjointness,ttt_set_disjointness_twice"),
        *("--metadata", json.dumps(metadata), "--limit", "4", "--device", "cpu", "--batch_size", "4"),
    ]
    results = json.loads(run_lm_eval(args, tmp_path, module=("ttt_mixer.cli", "eval")).read_text())["results"]
    for task in ("ttt_set_disjointness", "ttt_set_disjointness_twice"):
        for metric in ("acc@6", "acc@10", "exact_match@6", "exact_match@10"):
            assert 0.0 <= results[task][f"{metric},none"] <= 1.0, (task, metric, results[task])
