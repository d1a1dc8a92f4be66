"""``ttt-mixer swap`` and ``ttt-mixer distill`` on saved checkpoints: the swapped checkpoint holds the
named mixers and its tokenizer (from a folder or a Hub model id), distillation lowers the student's
held-out perplexity, the result loads in the ``lm_eval`` command line, and bad arguments end with a
message naming the option."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from eval_models import character_tokenizer, run_lm_eval, save_checkpoint, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ttt_mixer.cli import main
from ttt_mixer.eval_tasks import tasks_path
from ttt_mixer.tokenizer import TOKENIZER_FILES

pytestmark = pytest.mark.slow  # training or subprocesses

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = character_tokenizer()
    return save_checkpoint(tiny_model("llama", tokenizer), tokenizer, tmp_path_factory.mktemp("llama"))


def test_swap_then_distill(llama_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    swapped = tmp_path / "swapped"
    main(
        [
            "swap",
            str(llama_checkpoint),
            str(swapped),
            "--mixer",
            "ttt_linear",
            "--layers",
            "every:2",
            "--init",
            "attention",
            "--option",
            "mini_batch_size=8",
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(swapped, trust_remote_code=True)
    assert model.config.mixers == ["attention", "ttt_linear"]
    assert model.config.mixer_options == {"ttt_linear": {"mini_batch_size": 8}}
    assert len(AutoTokenizer.from_pretrained(swapped)) == len(character_tokenizer())

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    distilled = tmp_path / "distilled"
    main(
        [
            "distill",
            str(llama_checkpoint),
            str(swapped),
            str(distilled),
            "--text",
            str(text),
            "--seq-len",
            "32",
            "--layerwise-steps",
            "20",
            "--finetune-steps",
            "5",
            "--batch-size",
            "4",
        ]
    )
    out = capsys.readouterr().out
    before, after = map(float, re.search(r"student before (\S+), after (\S+)", out).groups())
    assert after < before
    assert (distilled / "model.safetensors").exists()

    # the plain lm-eval command line loads the hybrid through its auto_map
    metadata = {"mqar_seq_lengths": [16], "mqar_num_kv_pairs": 2, "num_samples": 2}
    results = run_lm_eval(
        [
            *("--model", "hf", "--model_args", f"pretrained={distilled},trust_remote_code=True"),
            *("--tasks", "ttt_mqar", "--include_path", str(tasks_path()), "--metadata", json.dumps(metadata)),
            *("--limit", "4", "--device", "cpu", "--batch_size", "4"),
        ],
        tmp_path,
    )
    scores = json.loads(results.read_text())["results"]["ttt_mqar"]
    assert 0.0 <= scores["acc@16,none"] <= 1.0, scores
    assert all(v > 1.0 for k, v in scores.items() if k.startswith("word_perplexity")), scores


def cache_as_hub_download(checkpoint: Path, cache: Path, repo_id: str, with_tokenizer: bool) -> None:
    """``checkpoint``'s files laid out as the Hugging Face cache holds a downloaded ``repo_id`` (its
    ``main`` ref naming one snapshot), with or without the tokenizer's files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    tokenizer_files = {*TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja"}
    for file in checkpoint.iterdir():
        if with_tokenizer or file.name not in tokenizer_files:
            shutil.copy(file, snapshot / file.name)


@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["with-tokenizer", "without"])
def test_swap_from_a_hub_model_id_saves_its_tokenizer(
    llama_checkpoint: Path, tmp_path: Path, with_tokenizer: bool
) -> None:
    """A Hub id (here served offline from a cache laid out as a download leaves it) gets its
    tokenizer saved beside the swapped model, as a folder does; one without a tokenizer says so."""
    cache_as_hub_download(llama_checkpoint, tmp_path / "cache", "someone/tiny-llama", with_tokenizer)
    out = tmp_path / "out"
    swap = ["swap", "someone/tiny-llama", str(out), "--mixer", "ttt_linear", "--layers", "0"]
    result = subprocess.run(
        [sys.executable, "-c", "import sys, ttt_mixer_cli; ttt_mixer_cli.main(sys.argv[1:])", *swap],
        env=subprocess_env(HF_HUB_CACHE=str(tmp_path / "cache"), PYTHONWARNINGS="ignore"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).config.mixers[0] == "ttt_linear"
    if with_tokenizer:
        assert len(AutoTokenizer.from_pretrained(out)) == len(character_tokenizer())
    else:
        assert "someone/tiny-llama has no tokenizer: none saved beside the model" in result.stdout
        assert not any((out / name).exists() for name in TOKENIZER_FILES)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mixer", "ttt_linear", "--layers", "0,7"], "out of range"),
        (["--mixer", "ttt_linear", "--layers", "first"], "--layers"),
        (["--mixer", "gla", "--init", "attention"], "init='attention'"),
        (["--mixer", "ttt_linear", "--option", "mini_batch_size"], "key=value"),
    ],
)
def test_swap_rejects_bad_arguments(
    llama_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as error:
        main(["swap", str(llama_checkpoint), str(tmp_path / "out"), *args])
    assert error.value.code == 2
    assert re.search(f"^ttt-mixer swap: error: .*{re.escape(message)}", capsys.readouterr().err, re.M)
