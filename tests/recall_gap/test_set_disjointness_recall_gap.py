"""``ttt-mixer recall-gap --task set_disjointness``: the option and its bad values, the training
documents (the eval task's construction, the answer the one label), the runs it plans (the task in
every run's spec, an MQAR run never reused for it), the tables naming their task, the lm-eval calls,
and the MQAR default unchanged; a tiny run end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ttt_mixer.eval_tasks import set_disjointness as task
from ttt_mixer.recall_gap import add_arguments, main, resolve_preset
from ttt_mixer.recall_gap.data import SetDisjointnessDataset, encode_set_disjointness_example, word_tokenizer
from ttt_mixer.recall_gap.evaluate import StateSize, _requests
from ttt_mixer.recall_gap.pipeline import _summary
from ttt_mixer.recall_gap.presets import CPU, ZOOLOGY_GPU, MQARShape
from ttt_mixer.recall_gap.report import TABLE_JSON, TABLE_MD, Row, jrt_prompt_table, markdown_table
from ttt_mixer.recall_gap.runner import SPEC_FILE, _claim, plan
from ttt_mixer.recall_gap.set_disjointness import (
    FIRST_FRACTIONS,
    MAX_LENGTH,
    SET_DISJOINTNESS_VOCAB,
    SetDisjointnessShape,
)
from ttt_mixer.recall_gap.vocabulary import IGNORE_INDEX, VOCAB

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SD = ["--task", "set_disjointness"]


def parse(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--out", "unused", *options])


def test_mqar_stays_the_default_task_with_its_runs_unchanged() -> None:
    preset = resolve_preset(parse())
    assert parse().task == "mqar" and preset == CPU and preset.task == "mqar"
    specs = plan(preset, (0,))
    # names, evaluation lengths (the JRT prompt's 128 + 2 x 16 tokens) and model sizes as before
    assert specs[0].name == "attention-d64-L32-kv4-lr0.001-seed0"
    assert {spec.max_length for spec in specs} == {160}
    assert specs[0].to_json()["task"] == "mqar" and len(specs[0].vocabulary) == len(VOCAB)
    summary = _summary(preset, (0,), None, 1.0)
    assert "16 sequences of MQAR L32-kv4 per mixer" in summary
    assert "(ttt_mqar, acc: the gold value is the likeliest of the sequence's values; chance 1/kv)" in summary
    sd = _summary(resolve_preset(parse(*SD)), (0,), None, 1.0)
    assert "64 sequences of set disjointness L16-first0.25, L16-first0.75 per mixer" in sd
    assert "(ttt_set_disjointness, acc: the shared symbol is the likeliest" in sd


def test_the_cpu_recipe_trains_both_set_orders_and_evaluates_both_at_1x_2x_4x() -> None:
    preset = resolve_preset(parse(*SD))
    recipe = CPU.set_disjointness
    assert recipe is not None and ZOOLOGY_GPU.set_disjointness is not None
    assert preset.task == "set_disjointness"
    assert (preset.steps, preset.batch_size, preset.eval_samples) == (
        recipe.steps,
        recipe.batch_size,
        recipe.eval_samples,
    )
    (length,) = recipe.lengths
    assert preset.train_shapes == tuple(SetDisjointnessShape(length, f) for f in FIRST_FRACTIONS)
    assert FIRST_FRACTIONS[0] < 0.5 < FIRST_FRACTIONS[1]  # the short set first, then the long one
    for train in preset.train_shapes:
        assert preset.eval_shapes(train) == tuple(
            sorted(SetDisjointnessShape(length * f, o) for f in (1, 2, 4) for o in FIRST_FRACTIONS)
        )
    # --seq-len is the two sets' symbols; the rest of the preset (mixers, model) is MQAR's
    shorter = resolve_preset(parse(*SD, "--seq-len", "8", "--steps", "7"))
    assert [shape.label for shape in shorter.train_shapes] == ["L8-first0.25", "L8-first0.75"]
    assert shorter.steps == 7 and shorter.mixers == CPU.mixers and shorter.widths == CPU.widths


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--task", "sd"], "argument --task: invalid choice: 'sd'"),
        ([*SD, "--kv-pairs", "4"], "--kv-pairs: set disjointness has no key-value pairs"),
        ([*SD, "--seq-len", "2"], f"--seq-len: a set-disjointness length must be in [3, {MAX_LENGTH}]"),
        (
            [*SD, "--seq-len", "100"],
            f"--seq-len and --length-factors: a set-disjointness length must be in [3, {MAX_LENGTH}] (two "
            "sets of distinct symbols sharing one), got 400",
        ),
    ],
)
def test_bad_set_disjointness_options_are_errors_that_name_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as error:
        main(["--out", str(tmp_path / "out"), *options])
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_shapes_refuse_lengths_and_orders_the_task_cannot_make() -> None:
    with pytest.raises(ValueError, match="first_fraction must be in"):
        SetDisjointnessShape(32, 1.0)
    with pytest.raises(ValueError, match=r"must be in \[3, "):
        SetDisjointnessShape(MAX_LENGTH + 1, 0.25)
    with pytest.raises(ValueError, match="train_shapes must be of one task"):
        dataclasses.replace(CPU, train_shapes=(MQARShape(32, 4), SetDisjointnessShape(32, 0.25)))
    with pytest.raises(ValueError, match="task must be one of"):
        CPU.for_task("sd")


@pytest.mark.parametrize("fraction", FIRST_FRACTIONS)
def test_a_training_document_is_the_eval_tasks_context_and_its_answer(fraction: float) -> None:
    length = 20
    example = encode_set_disjointness_example(np.random.default_rng(5), length, fraction)
    # the same draw through the eval task's own construction
    first, second, shared = task.sets(np.random.default_rng(5), length, fraction)
    assert (len(first), len(second)) == task.set_sizes(length, fraction)
    ids = example["input_ids"]
    assert ids.shape == (length + 3,)  # the sets, "|", "=" and the answer
    tokenizer = word_tokenizer(SET_DISJOINTNESS_VOCAB)
    context = task.prompt(first, second, twice=False)
    assert tokenizer.decode(ids[:-1]) == context and tokenizer.decode(ids[-1:]) == shared
    assert ids.tolist() == tokenizer(f"{context} {shared}")["input_ids"]
    # the loss is on the answer alone
    labels = example["labels"]
    assert labels[-1] == SET_DISJOINTNESS_VOCAB[shared]
    assert (labels[:-1] == IGNORE_INDEX).all()


def test_the_vocabulary_covers_every_token_of_both_prompts_and_keeps_mqars_ids() -> None:
    tokenizer = word_tokenizer(SET_DISJOINTNESS_VOCAB)
    docs = task.set_disjointness_twice_dataset(sd_lengths=[MAX_LENGTH], num_samples=2)["test"]
    for doc in docs:
        ids = tokenizer(doc["context"])["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) == 2 * MAX_LENGTH + 4
    assert all(SET_DISJOINTNESS_VOCAB[word] == i for word, i in VOCAB.items())


def test_the_training_data_is_fixed_by_seed_and_index() -> None:
    shape = SetDisjointnessShape(16, 0.75)
    data = SetDisjointnessDataset(6, shape, seed=3)
    assert len(data) == 6
    assert all((data[i]["input_ids"] == data[i]["input_ids"]).all() for i in range(6))
    assert not (data[0]["input_ids"] == data[1]["input_ids"]).all()
    assert not (data[0]["input_ids"] == SetDisjointnessDataset(6, shape, seed=4)[0]["input_ids"]).all()
    with pytest.raises(ValueError, match="size must be >= 1"):
        SetDisjointnessDataset(0, shape, seed=0)


def test_the_plan_records_the_task_in_every_spec_and_an_mqar_run_is_never_reused(tmp_path: Path) -> None:
    preset = resolve_preset(parse(*SD, "--mixers", "attention,based"))
    specs = plan(preset, (0,))
    assert [spec.name for spec in specs] == [
        "attention-d64-L16-first0.25-lr0.001-seed0",
        "attention-d64-L16-first0.75-lr0.001-seed0",
        "based-d64-L16-first0.25-lr0.01-seed0",
        "based-d64-L16-first0.75-lr0.01-seed0",
    ]
    assert {spec.to_json()["task"] for spec in specs} == {"set_disjointness"}
    # the JRT prompt at L=64 (the symbols twice, 4 separators) and its answer
    assert {spec.max_length for spec in specs} == {2 * 64 + 5}
    assert len(specs[0].vocabulary) == len(VOCAB) + 2
    # an MQAR run's spec, as written before the task was recorded (no "task"), in the same folder
    mqar = plan(CPU, (0,))[0]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = mqar.to_json()
    del old["task"]
    (run_dir / SPEC_FILE).write_text(json.dumps(old))
    _claim(run_dir, mqar)  # MQAR reuses it
    with pytest.raises(ValueError, match=r"holds a run with other settings \(.*task.*differ\)"):
        _claim(run_dir, specs[0])


def test_the_tables_name_their_task_and_what_the_jrt_prompt_repeats() -> None:
    train = SetDisjointnessShape(32, 0.25)
    shapes = [train, SetDisjointnessShape(64, 0.25), SetDisjointnessShape(32, 0.75)]
    once = dict(zip(shapes, (1.0, 0.9, 0.5), strict=True))
    twice = dict(zip(shapes, (1.0, 0.95, 0.75), strict=True))
    row = Row("based", "/runs/based", 10, StateSize(64), once, "based", 64, 1e-2, train, 12.0, twice)
    table = markdown_table([row], learned_accuracy=0.9)
    assert table.splitlines()[:3] == [
        "Trained on set disjointness L32-first0.25:",
        "",
        "| mixer | learning rate | parameters | recurrent state size | acc L=32 first=0.25 "
        "| acc L=64 first=0.25 | acc L=32 first=0.75 | training time |",
    ]
    assert jrt_prompt_table([row]).splitlines()[0] == (
        "JRT prompt, the two sets read twice (trained on set disjointness L32-first0.25): accuracy "
        "(change from reading once):"
    )
    assert "| based | 1.000 (+0.000) | 0.950 (+0.050) | 0.750 (+0.250) |" in jrt_prompt_table([row])
    # MQAR's captions as before
    kv4 = {MQARShape(32, 4): 1.0}
    mqar = Row("based", "/runs/based", 10, StateSize(64), kv4, "based", 64, 1e-2, MQARShape(32, 4), 12.0, kv4)
    assert markdown_table([mqar]).startswith("Trained on MQAR L32-kv4:")
    assert jrt_prompt_table([mqar]).startswith(
        "JRT prompt, the key-value pairs read twice (trained on MQAR L32-kv4)"
    )


def test_lm_eval_is_called_once_per_set_order_and_once_per_pair_count() -> None:
    shapes = [SetDisjointnessShape(n, f) for n in (32, 64) for f in FIRST_FRACTIONS]
    requests = _requests(shapes)
    assert [(r.tasks, r.suffix, r.metadata) for r in requests] == [
        (
            ("ttt_set_disjointness", "ttt_set_disjointness_twice"),
            f"_first{f:g}",
            {"sd_lengths": [32, 64], "sd_first_fraction": f},
        )
        for f in FIRST_FRACTIONS
    ]
    (mqar,) = _requests([MQARShape(32, 4), MQARShape(64, 4)])
    assert (mqar.tasks, mqar.suffix) == (("ttt_mqar", "ttt_mqar_twice"), "_kv4")
    assert mqar.metadata == {"mqar_seq_lengths": [32, 64], "mqar_num_kv_pairs": 4}
    with pytest.raises(ValueError, match="shapes must be of one task"):
        _requests([MQARShape(32, 4), SetDisjointnessShape(32, 0.25)])


@pytest.mark.slow
def test_a_tiny_set_disjointness_run_trains_evaluates_and_reports_both_orders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tiny = [
        *("--widths", "32", "--heads", "2", "--steps", "2", "--batch-size", "4", "--seq-len", "8"),
        *("--length-factors", "1,2", "--eval-samples", "2", "--save-steps", "2", "--mixers", "attention"),
        *("--min-attention-accuracy", "0", "--jobs", "1"),
    ]
    main(["--out", str(out), *SD, *tiny])
    data = json.loads((out / TABLE_JSON).read_text())
    assert data["task"] == "set_disjointness"
    labels = {f"L{n}-first{f:g}" for n in (8, 16) for f in FIRST_FRACTIONS}
    assert [row["train_shape"] for row in data["rows"]] == ["L8-first0.25", "L8-first0.75"]
    for row in data["rows"]:
        assert set(row["accuracy"]) == set(row["accuracy_twice"]) == labels
        run_dir = Path(row["checkpoint"]).parent
        assert json.loads((run_dir / SPEC_FILE).read_text())["task"] == "set_disjointness"
        results = json.loads((run_dir / "lm_eval_results.json").read_text())["results"]
        assert set(results) == {
            f"{name}_first{f:g}"
            for name in ("ttt_set_disjointness", "ttt_set_disjointness_twice")
            for f in FIRST_FRACTIONS
        }
    markdown = (out / TABLE_MD).read_text()
    assert markdown.startswith("# set disjointness recall gap")
    assert "JRT prompt, the two sets read twice (trained on set disjointness L8-first0.75)" in markdown
