"""``ttt-mixer eval`` runs lm-eval's command line on a TTT checkpoint without trust_remote_code, with
ttt-mixer's tasks included; ``ttt-mixer plot`` draws its per-length results (and per-position
buckets) as PNGs, several models per figure, and rejects files it cannot plot with a clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from eval_models import character_tokenizer, run_lm_eval, save_checkpoint, tiny_model

from ttt_mixer.cli import main as cli_main
from ttt_mixer.eval_tasks import tasks_path
from ttt_mixer.evaluation import lm_eval_argv
from ttt_mixer.plotting import PlotError, plot_results

pytestmark = pytest.mark.slow  # training or subprocesses

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MQAR_LENGTHS = (16, 24)


@pytest.fixture(scope="module")
def eval_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The results JSON of ``ttt-mixer eval`` on ttt_mqar with a tiny random TTT checkpoint."""
    tmp_path = tmp_path_factory.mktemp("ttt-eval")
    tokenizer = character_tokenizer()
    checkpoint = save_checkpoint(tiny_model("ttt", tokenizer), tokenizer, tmp_path / "tiny-ttt")
    metadata = {"mqar_seq_lengths": list(MQAR_LENGTHS), "mqar_num_kv_pairs": 2, "num_samples": 2}
    args = [
        *("--model", "hf", "--model_args", f"pretrained={checkpoint}", "--tasks", "ttt_mqar"),
        *("--metadata", json.dumps(metadata), "--limit", "4", "--device", "cpu", "--batch_size", "4"),
    ]
    return run_lm_eval(args, tmp_path, module=("ttt_mixer.cli", "eval"))


def test_eval_loads_a_ttt_checkpoint_without_remote_code_and_scores_ttt_mqar(eval_results: Path) -> None:
    data = json.loads(eval_results.read_text())
    assert "trust_remote_code" not in data["config"]["model_args"]
    scores = data["results"]["ttt_mqar"]
    for length in MQAR_LENGTHS:
        for metric in ("acc", "exact_match"):
            assert 0.0 <= scores[f"{metric}@{length},none"] <= 1.0, scores


def test_eval_arguments_pass_through_with_the_task_folder_added(tmp_path: Path) -> None:
    args = ["--model", "hf", "--model_args", "pretrained=x", "--tasks", "ttt_mqar", "--limit", "4"]
    assert lm_eval_argv(args, tmp_path) == [*args, "--include_path", tasks_path()]
    assert lm_eval_argv(["ls", "tasks"], tmp_path) == ["ls", "tasks", "--include_path", tasks_path()]
    assert lm_eval_argv(["--help"], tmp_path) == ["--help"]
    assert lm_eval_argv([], tmp_path) == []


def test_eval_keeps_the_users_task_folders_and_config(tmp_path: Path) -> None:
    user_config = tmp_path / "user.yaml"
    user_config.write_text(yaml.safe_dump({"include_path": "/from/config", "limit": 3}))
    args = ["--tasks", "mine", "--include_path=/mine", "--config", str(user_config), "--device", "cpu"]
    argv = lm_eval_argv(args, tmp_path)
    assert argv[:-2] == ["--tasks", "mine", "--device", "cpu"] and argv[-2] == "--config"
    merged = yaml.safe_load(Path(argv[-1]).read_text())
    assert merged == {"include_path": [tasks_path(), "/from/config", "/mine"], "limit": 3}


def synthetic_results(path: Path) -> Path:
    """A second model's results: MQAR at the same lengths and perplexity by position buckets, with
    ``model_args`` in lm-eval's string form."""
    results = {
        "ttt_mqar": {
            "alias": "ttt_mqar",
            **{f"acc@{n},none": 0.5 + n / 100 for n in MQAR_LENGTHS},
            **{f"acc@{n}_stderr,none": 0.05 for n in MQAR_LENGTHS},
            **{f"exact_match@{n},none": 0.1 for n in MQAR_LENGTHS},
            **{f"exact_match@{n}_stderr,none": "N/A" for n in MQAR_LENGTHS},
        },
        "ttt_ppl_position": {
            "alias": "ttt_ppl_position",
            "ppl@0-512,none": 30.0,
            "ppl@512-1024,none": 22.0,
            "ppl@1024-2048,none": 18.5,
            "ppl@2048-4096,none": 17.0,
        },
    }
    config = {"model": "hf", "model_args": "pretrained=org/other-model,dtype=float32"}
    path.write_text(json.dumps({"results": results, "config": config}))
    return path


def read_png(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    return matplotlib.image.imread(path).shape


def test_plot_writes_one_png_per_task_and_metric(
    eval_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = synthetic_results(tmp_path / "other.json")
    cli_main(["plot", str(eval_results), str(other), "--out", str(tmp_path / "plots")])
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    assert {p.name for p in printed} == {
        "ttt_mqar_acc.png",
        "ttt_mqar_exact_match.png",
        "ttt_ppl_position_ppl.png",
    }
    for path in printed:
        height, width, channels = read_png(path)
        assert height > 100 and width > 100 and channels in (3, 4)


def test_plot_labels_lines_by_model_and_orders_points() -> None:
    from ttt_mixer.plotting import model_label, plottable_metrics

    results = {
        "results": {"t": {"ppl@512-1024,none": 2.0, "ppl@0-512,none": 3.0, "acc,none": 0.5}},
        "config": {"model_args": {"pretrained": "/some/dir/my-model"}},
    }
    assert model_label(results, Path("r.json")) == "my-model"
    assert model_label({"results": {}}, Path("x/run-7.json")) == "run-7"
    (points,) = plottable_metrics(results).values()
    assert [(p.start, p.end, p.value, p.x) for p in points] == [(0, 512, 3.0, 256), (512, 1024, 2.0, 768)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("not json {", "not an lm-eval results JSON"),
        ('{"versions": {}}', "no 'results' mapping"),
        ('{"results": {"t": {"acc,none": 0.5, "acc_stderr,none": 0.1}}}', "no plottable metric"),
    ],
)
def test_plot_rejects_files_it_cannot_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PlotError, match=message):
        plot_results([path], tmp_path / "plots")
    with pytest.raises(SystemExit) as error:
        cli_main(["plot", str(path), "--out", str(tmp_path / "plots")])
    assert error.value.code == 2
    assert re.search(f"ttt-mixer plot: error: .*{message}", capsys.readouterr().err)
    assert not (tmp_path / "plots").exists()
