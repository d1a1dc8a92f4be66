"""The ``ttt_recall`` group's synthetic tasks (``eval_tasks/recall.py``): deterministic generators
with Zoology's MQAR semantics, prompts sized with the model's tokenizer, scoring that puts noise near
chance and an oracle at 1, clear errors for bad options, and one run of the real ``lm_eval`` command
line over all three tasks on a tiny TTT checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from eval_models import MODEL_KINDS, character_tokenizer, run_lm_eval, save_checkpoint, tiny_model

from ttt_mixer.cli import main as cli_main
from ttt_mixer.eval_tasks import recall, tasks_path

TOKENIZER = character_tokenizer()


def documents(build, **metadata) -> list[dict]:
    """The test split a ``*_dataset`` function builds, as dicts."""
    return build(tokenizer=TOKENIZER, **metadata)["test"].to_list()


def count_tokens(text: str) -> int:
    return len(TOKENIZER(text, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------------------------------- MQAR


def test_mqar_generator_is_deterministic_and_zoology_shaped() -> None:
    sequences = [recall.mqar_sequence(np.random.default_rng(s), 128, 8, 0.01) for s in range(50)]
    again = [recall.mqar_sequence(np.random.default_rng(s), 128, 8, 0.01) for s in range(50)]
    assert sequences == again
    for seq in sequences:
        assert len(seq.symbols) == 128
        assert set(seq.keys) <= set(recall.MQAR_KEYS) and set(seq.values) <= set(recall.MQAR_VALUES)
        assert not set(recall.MQAR_KEYS) & set(recall.MQAR_VALUES)
        assert len(set(seq.keys)) == len(set(seq.values)) == 8
        assert list(seq.symbols[:16:2]) == list(seq.keys) and list(seq.symbols[1:16:2]) == list(seq.values)
        bound = dict(zip(seq.keys, seq.values, strict=True))
        assert sorted(seq.query_positions) == list(seq.query_positions)
        for position, answer in zip(seq.query_positions, seq.answers, strict=True):
            key = seq.symbols[position]
            assert position >= 16 and key in seq.symbols[:position:2] and bound[key] == answer
        # keys appear only in their pair and their query
        assert sum(s in bound for s in seq.symbols) == 16


def test_mqar_gaps_follow_a_power_law() -> None:
    gaps = np.concatenate(
        [recall.mqar_sequence(np.random.default_rng(s), 512, 8, 0.01).gaps for s in range(300)]
    )
    # p(g) ∝ (g + 1) ** -0.99 over 248 slots: short gaps far more frequent than long ones
    assert (gaps < 8).mean() > 2 * (gaps >= 124).mean()
    counts = np.bincount(gaps, minlength=248)
    assert counts[:4].sum() > counts[124:128].sum() * 5


def test_mqar_documents_interleave_lengths_and_cover_every_query() -> None:
    options = {"mqar_seq_lengths": [16, 32], "mqar_num_kv_pairs": 3, "num_samples": 2}
    docs = documents(recall.mqar_dataset, **options)
    assert len(docs) == 2 * 3 * 2 and [d["length"] for d in docs][:2] == [16, 32]
    assert docs == documents(recall.mqar_dataset, **options)
    for doc in docs:
        symbols = doc["context"].split(" ")
        assert len(symbols) <= doc["length"]
        key, answer = symbols[-1], doc["choices"][doc["gold"]]
        assert symbols[symbols.index(key) + 1] == answer  # the queried key's pair comes first


def mqar_docs(count: int, num_kv_pairs: int = 4) -> list[dict]:
    return documents(
        recall.mqar_dataset, mqar_seq_lengths=[32, 64], mqar_num_kv_pairs=num_kv_pairs, num_samples=count
    )


def mean_scores(docs: list[dict], results: list[list[tuple[float, bool]]]) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for doc, result in zip(docs, results, strict=True):
        for key, value in recall.mqar_process_results(doc, result).items():
            scores.setdefault(key, []).append(value)
    return {key: float(np.mean(values)) for key, values in scores.items()}


def test_mqar_scoring_puts_noise_at_chance_and_an_oracle_at_one() -> None:
    docs = mqar_docs(200)
    rng = np.random.default_rng(0)
    noise = [[(float(rng.normal()), False) for _ in doc["choices"]] for doc in docs]
    scores = mean_scores(docs, noise)
    assert set(scores) == {"acc@32", "acc@64", "exact_match@32", "exact_match@64"}
    for length in (32, 64):
        assert scores[f"acc@{length}"] == pytest.approx(1 / 4, abs=0.05)
        assert scores[f"exact_match@{length}"] == 0.0
    oracle = [
        [(0.0 if i == doc["gold"] else -5.0, i == doc["gold"]) for i in range(len(doc["choices"]))]
        for doc in docs
    ]
    assert set(mean_scores(docs, oracle).values()) == {1.0}


# -------------------------------------------------------------------------- phonebook and passkey


@pytest.mark.parametrize("task", ["passkey", "phonebook"])
def test_prompts_have_the_requested_token_length(task: str) -> None:
    build = getattr(recall, f"{task}_dataset")
    docs = documents(build, context_lengths=[200, 333, 700], num_samples=5)
    assert docs == documents(build, context_lengths=[200, 333, 700], num_samples=5)
    assert [d["length"] for d in docs[:3]] == [200, 333, 700]
    # the prompt and the tokens lm-eval keeps free to generate: within one filler unit (a word, a
    # phonebook entry) below the length, never above it
    tolerance = 8 if task == "passkey" else 24  # longest word, longest entry
    generated = getattr(recall, f"{task.upper()}_MAX_GEN_TOKS")
    for doc in docs:
        assert doc["length"] - tolerance <= count_tokens(doc["context"]) + generated <= doc["length"]
        assert doc["answer"] in doc["context"]


def test_passkey_depths_place_the_needle() -> None:
    docs = documents(
        recall.passkey_dataset, context_lengths=[1000], num_samples=3, passkey_depths=[0, 0.5, 1]
    )
    relative = [doc["context"].index("The pass key is") / len(doc["context"]) for doc in docs]
    assert relative[0] < 0.1 and 0.4 < relative[1] < 0.6 and relative[2] > 0.85


def test_phonebook_entries_are_distinct() -> None:
    entries = recall.phonebook_entries(np.random.default_rng(0), 500)
    assert len({n for n, _ in entries}) == len({p for _, p in entries}) == 500


def test_generation_scoring_reads_the_first_answer() -> None:
    phone = {"answer": "123-4567", "length": 64}
    assert recall.phonebook_process_results(phone, [" 123-4567.\n"]) == {"exact_match@64": 1.0}
    assert recall.phonebook_process_results(phone, [" 765-4321 or 123-4567"]) == {"exact_match@64": 0.0}
    passkey = {"answer": "40213", "length": 128}
    assert recall.passkey_process_results(passkey, [" 40213. Remember"]) == {"exact_match@128": 1.0}
    assert recall.passkey_process_results(passkey, [" 402130"]) == {"exact_match@128": 0.0}
    assert recall.passkey_process_results(passkey, [" no idea"]) == {"exact_match@128": 0.0}


# ------------------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("build", "metadata", "option"),
    [
        (recall.mqar_dataset, {"mqar_num_kv_pairs": 0}, "mqar_num_kv_pairs"),
        (recall.mqar_dataset, {"mqar_num_kv_pairs": 8, "mqar_seq_lengths": [64, 31]}, "mqar_seq_lengths"),
        (recall.mqar_dataset, {"mqar_seq_lengths": []}, "mqar_seq_lengths"),
        (recall.mqar_dataset, {"mqar_power_a": 0}, "mqar_power_a"),
        (recall.mqar_dataset, {"mqar_num_pairs": 4}, "mqar_num_pairs"),
        (recall.mqar_dataset, {"num_samples": 0}, "num_samples"),
        (recall.passkey_dataset, {"context_lengths": [512, 40]}, "context_lengths"),
        (recall.passkey_dataset, {"passkey_depths": [1.5]}, "passkey_depths"),
        (recall.passkey_dataset, {"passkey_digits": "5"}, "passkey_digits"),
        (recall.phonebook_dataset, {"context_lengths": [60]}, "context_lengths"),
        (recall.phonebook_dataset, {"phonebook_size": 10}, "phonebook_size"),
    ],
)
def test_bad_options_raise_naming_the_option(build, metadata: dict, option: str) -> None:
    with pytest.raises(ValueError, match=f"'{option}'"):
        build(tokenizer=TOKENIZER, **metadata)


def test_options_ignore_model_arguments() -> None:
    options = recall.parse_options({"pretrained": "x", "trust_remote_code": True, "version": 1.0})
    assert options.context_lengths == tuple(recall.OPTION_DEFAULTS["context_lengths"])


def test_tasks_path_command(capsys: pytest.CaptureFixture[str]) -> None:
    cli_main(["tasks-path"])
    folder = Path(capsys.readouterr().out.strip())
    assert folder == Path(tasks_path())
    assert {"ttt_recall.yaml", "ttt_mqar.yaml", "ttt_phonebook.yaml", "ttt_passkey.yaml"} <= {
        p.name for p in folder.glob("*.yaml")
    }


# -------------------------------------------------------------------------------- lm_eval end to end


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_lm_eval_command_line_scores_the_group_per_length(tmp_path: Path, kind: str) -> None:
    # ttt_recall_synthetic: the synthetic half of ttt_recall (the real-data half, ttt_recall_data,
    # reads hub datasets by default; tests/eval_tasks/test_eval_tasks_data.py runs it on local files)
    checkpoint = save_checkpoint(tiny_model(kind, TOKENIZER), TOKENIZER, tmp_path / kind)
    metadata = {
        "context_lengths": [192, 256],
        "mqar_seq_lengths": [16, 24],
        "mqar_num_kv_pairs": 2,
        "sd_lengths": [6, 10],
        "num_samples": 2,
    }
    args = [
        *("--model", "hf", "--model_args", f"pretrained={checkpoint},trust_remote_code=True"),
        *("--tasks", "ttt_recall_synthetic", "--include_path", tasks_path()),
        *("--metadata", json.dumps(metadata)),
        *("--limit", "4", "--device", "cpu", "--batch_size", "4"),
    ]
    results = json.loads(run_lm_eval(args, tmp_path).read_text())["results"]
    expected = {
        "ttt_mqar": ["acc@16", "acc@24", "exact_match@16", "exact_match@24"],
        "ttt_mqar_twice": ["acc@16", "acc@24", "exact_match@16", "exact_match@24"],
        "ttt_phonebook": ["exact_match@192", "exact_match@256"],
        "ttt_passkey": ["exact_match@192", "exact_match@256"],
        **{
            task: ["acc@6", "acc@10", "exact_match@6", "exact_match@10"]
            for task in ("ttt_set_disjointness", "ttt_set_disjointness_twice")
        },
    }
    for task, metrics in expected.items():
        for metric in metrics:
            assert 0.0 <= results[task][f"{metric},none"] <= 1.0, (task, metric, results[task])
