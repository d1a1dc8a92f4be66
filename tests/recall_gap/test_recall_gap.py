"""``ttt-mixer recall-gap`` shortened: every mixer trains a few steps through the Trainer, is saved,
reloaded and evaluated through lm-eval; the tables and the plot hold every row; a rerun reuses the
finished runs; an interrupted training resumes from its checkpoint; bad options and an attention
model that did not learn are reported as errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ttt_mixer.adapters import MIXER_NAMES, MixerLlamaForCausalLM, MixerMambaForCausalLM
from ttt_mixer.recall_gap import main, seed_list
from ttt_mixer.recall_gap.data import mqar_tokenizer
from ttt_mixer.recall_gap.evaluate import StateSize, state_size
from ttt_mixer.recall_gap.pipeline import recall_gap
from ttt_mixer.recall_gap.presets import ALL_MIXERS, CPU, ZOOLOGY_GPU, MQARShape
from ttt_mixer.recall_gap.report import (
    PLOT_PNG,
    TABLE_JSON,
    TABLE_MD,
    Row,
    Spread,
    jrt_prompt_table,
    markdown_table,
    over_seeds,
)
from ttt_mixer.recall_gap.runner import plan, start_order
from ttt_mixer.recall_gap.train import (
    MODEL_DIR,
    TRAINER_DIR,
    RecallTrainer,
    RunSpec,
    build_model,
    train_run,
)
from ttt_mixer.recall_gap.vocabulary import VOCAB

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# a few steps of a width-32 model on MQAR L16-kv2, evaluated at L16 and L32 on 2 sequences per shape
TINY = [
    *("--widths", "32", "--heads", "2", "--steps", "3", "--batch-size", "4"),
    *("--seq-len", "16", "--kv-pairs", "2", "--length-factors", "1,2", "--eval-samples", "2"),
    *("--save-steps", "2", "--mixers", ",".join(ALL_MIXERS)),
]
SHAPES = ["L16-kv2", "L32-kv2", "L32-kv4"]


def test_the_presets_cover_every_mixer_and_evaluate_at_1x_2x_4x_the_training_length() -> None:
    assert set(ALL_MIXERS) == set(MIXER_NAMES)
    (train,) = CPU.train_shapes
    lengths = {shape.seq_len for shape in CPU.eval_shapes(train)}
    assert lengths == {train.seq_len, 2 * train.seq_len, 4 * train.seq_len}
    assert MQARShape(4 * train.seq_len, 4 * train.num_kv_pairs) in CPU.eval_shapes(train)


def test_the_cpu_preset_starts_mamba_and_longhorn_as_docs_say() -> None:
    """In the CPU preset's model Mamba's decays start at -1 with a full-rank dt projection and its
    projections at N(0, 0.05), and Longhorn's rates near sigmoid(-3) with its projections at
    N(0, 0.1), over the backbone's init, both with the skip D at 0 (docs/recall_gap.md); the GPU
    preset keeps the authors' starts."""
    (shape,) = CPU.train_shapes

    def mixers(mixer: str, options: dict) -> list[torch.nn.Module]:
        spec = RunSpec(mixer, 64, CPU.num_layers, 1, shape, 1, 1, 1e-3, 0, 128, options, CPU.backbone)
        return [layer.mixer for layer in build_model(spec).backbone.layers]

    for mamba in mixers("mamba", CPU.mixer_options["mamba"]):
        assert torch.equal(mamba.A_log, torch.zeros_like(mamba.A_log)) and mamba.time_step_rank == 64
        assert torch.equal(mamba.D, torch.zeros_like(mamba.D))
        assert abs(mamba.x_proj.weight.std().item() - 0.05) < 0.005
    for longhorn in mixers("longhorn", CPU.mixer_options["longhorn"]):
        assert torch.equal(longhorn.dt_head.bias, torch.full_like(longhorn.dt_head.bias, -3.0))
        assert abs(longhorn.x_proj.weight.std().item() - 0.1) < 0.01
        assert torch.equal(longhorn.D, torch.zeros_like(longhorn.D))
    assert "longhorn" not in ZOOLOGY_GPU.mixer_options
    assert not {"A_init", "D_init"} & set(ZOOLOGY_GPU.mixer_options["mamba"])


@pytest.mark.slow
def test_every_mixer_trains_saves_reloads_and_is_evaluated_and_a_rerun_reuses_the_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    # two worker processes, as the CPU default runs (one per core)
    main(["--out", str(out), *TINY, "--jobs", "2", "--min-attention-accuracy", "0"])
    table = capsys.readouterr().out
    data = json.loads((out / TABLE_JSON).read_text())
    assert data["status"] == "ok"
    assert [row["mixer"] for row in data["rows"]] == list(ALL_MIXERS)
    markdown = (out / TABLE_MD).read_text()
    for row in data["rows"]:
        assert set(row["accuracy"]) == set(row["accuracy_twice"]) == set(SHAPES)
        assert all(0 <= acc <= 1 for acc in [*row["accuracy"].values(), *row["accuracy_twice"].values()])
        assert row["parameters"] > 0 and row["train_seconds"] > 0
        assert row["state_size"] > 0
        assert row["state_grows_with_length"] == (row["mixer"] == "attention")
        assert f"| {row['mixer']} |" in markdown and f"| {row['mixer']} |" in table
        # the saved checkpoint reloads as lm-eval loaded it, and lm-eval's own results were kept
        model = AutoModelForCausalLM.from_pretrained(row["checkpoint"], trust_remote_code=True)
        assert sum(p.numel() for p in model.parameters()) == row["parameters"]
        lm_eval_results = json.loads((Path(row["checkpoint"]).parent / "lm_eval_results.json").read_text())
        assert set(lm_eval_results["results"]) == {
            f"{task}_kv{pairs}" for task in ("ttt_mqar", "ttt_mqar_twice") for pairs in (2, 4)
        }
        assert "Running loglikelihood requests" in (Path(row["checkpoint"]).parent / "log.txt").read_text()
    # the JRT prompt's table: every mixer, each shape's accuracy with the pairs read twice
    jrt = markdown.split("JRT prompt, the key-value pairs read twice (trained on MQAR L16-kv2)")[1]
    assert all(f"| {row['mixer']} |" in jrt for row in data["rows"]) and "JRT prompt" in table
    assert (out / PLOT_PNG).stat().st_size > 10_000
    # three steps teach (almost) nothing: the rows below the bar are named as not learned
    below = [row["name"] for row in data["rows"] if row["accuracy"]["L16-kv2"] < CPU.learned_accuracy]
    assert data["learned_accuracy"] == CPU.learned_accuracy and data["not_learned"] == below
    assert below and f"Not learned (below {CPU.learned_accuracy:g} at the training shape): " in markdown

    # a rerun trains and evaluates nothing again; with the default sanity check it fails, since
    # three steps teach attention nothing, and says so instead of printing the table
    trained = {path: path.stat().st_mtime_ns for path in out.rglob("model.safetensors")}
    with pytest.raises(SystemExit) as failure:
        main(["--out", str(out), *TINY, "--jobs", "1"])
    assert failure.value.code != 0 and "FAILED" in str(failure.value.code)
    assert "attention" in str(failure.value.code) and "0.9" in str(failure.value.code)
    assert {path: path.stat().st_mtime_ns for path in out.rglob("model.safetensors")} == trained
    assert json.loads((out / TABLE_JSON).read_text())["status"] == "failed"
    assert "| attention |" not in capsys.readouterr().out

    # the same checkpoints evaluated as given checkpoints: the same accuracies; and a plain Llama
    # (a checkpoint not made here) has its KV cache as state
    llama = tmp_path / "llama"
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = LlamaConfig(vocab_size=len(VOCAB), num_key_value_heads=2, **sizes)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(llama)
    mqar_tokenizer().save_pretrained(llama)
    checkpoints = [row["checkpoint"] for row in data["rows"][:2]]
    main(
        [
            "--out",
            str(tmp_path / "given"),
            *TINY,
            "--jobs",
            "1",
            "--checkpoints",
            ",".join([*checkpoints, str(llama)]),
        ]
    )
    given = json.loads((tmp_path / "given" / TABLE_JSON).read_text())["rows"]
    # a given checkpoint is named by its folder and its parent's (the run's name)
    assert [row["name"] for row in given] == [
        f"attention-d32-L16-kv2-lr{CPU.learning_rates['attention']:g}-seed0/model",
        f"based-d32-L16-kv2-lr{CPU.learning_rates['based']:g}-seed0/model",
        "llama",
    ]
    for key in ("accuracy", "accuracy_twice"):
        assert [row[key] for row in given[:2]] == [row[key] for row in data["rows"][:2]]
    assert [row["train_seconds"] for row in given] == [None, None, None]
    assert given[2]["state_size"] == 2 * 2 * 32 * 16 and given[2]["state_grows_with_length"]


def test_the_table_names_the_trained_rows_below_the_learned_bar_and_only_them() -> None:
    shape, longer = MQARShape(32, 4), MQARShape(64, 4)

    def row(name: str, accuracy: float, trained: bool = True) -> Row:
        accuracies = {shape: accuracy, longer: 0.5}
        if not trained:
            return Row(name, f"/given/{name}", 10, StateSize(64), accuracies)
        return Row(name, f"/runs/{name}", 10, StateSize(64), accuracies, name, 64, 1e-3, shape, 12.0)

    learned, stalled, given = row("attention", 0.95), row("mamba", 0.289), row("ckpt", 0.1, trained=False)
    table = markdown_table([learned, stalled, given], learned_accuracy=0.9)
    trained, checkpoints = table.split("Evaluated checkpoints:")
    note = [line for line in trained.splitlines() if line.startswith("Not learned")]
    assert note == [
        "Not learned (below 0.9 at the training shape): mamba (0.289). Their other columns measure an "
        "undertrained model, not what the mixer can recall."
    ]
    # evaluated checkpoints have no training shape to judge them by; without a bar, no note
    assert "Not learned" not in checkpoints
    assert "Not learned" not in markdown_table([learned, stalled, given])
    assert "Not learned" not in markdown_table([learned], learned_accuracy=0.9)


def test_the_jrt_prompt_table_gives_each_accuracy_read_twice_and_its_change() -> None:
    shape, longer = MQARShape(32, 4), MQARShape(64, 4)
    once = {shape: 0.5, longer: 0.25}
    jrt = Row(
        "based",
        "/runs/based",
        10,
        StateSize(64),
        once,
        "based",
        64,
        1e-3,
        shape,
        12.0,
        {shape: 0.75, longer: 0.2},
    )
    plain = Row("mamba", "/runs/mamba", 10, StateSize(64), once, "mamba", 64, 1e-3, shape, 12.0)
    table = jrt_prompt_table([jrt, plain])
    assert table.splitlines()[2:] == [
        "| mixer | acc L=32 kv=4 | acc L=64 kv=4 |",
        "|---|---|---|",
        "| based | 0.750 (+0.250) | 0.200 (-0.050) |",
    ]
    assert jrt_prompt_table([plain]) == ""


class StopAt(TrainerCallback):
    """Ends training after ``step`` (as a kill after that step's checkpoint would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> TrainerControl:
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.slow
def test_an_interrupted_training_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    spec = RunSpec("ttt_linear", 32, 2, 2, MQARShape(16, 2), 6, 4, 3e-3, 0, 32)
    interrupted = train_run(spec, tmp_path / "a", save_steps=3, progress_bars=False, callbacks=[StopAt(4)])
    assert interrupted.resumed_from_step is None
    assert not (tmp_path / "a" / MODEL_DIR).exists()
    assert [p.name for p in (tmp_path / "a" / TRAINER_DIR).iterdir()] == ["checkpoint-3"]
    state = json.loads((tmp_path / "a" / TRAINER_DIR / "checkpoint-3" / "trainer_state.json").read_text())
    before = state["stateful_callbacks"]["TrainingClock"]["args"]["elapsed"]

    resumed = train_run(spec, tmp_path / "a", save_steps=3, progress_bars=False)
    assert resumed.resumed_from_step == 3
    assert resumed.train_seconds > before > 0  # the time of the first 3 steps is kept
    straight = train_run(spec, tmp_path / "b", save_steps=3, progress_bars=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / MODEL_DIR, trust_remote_code=True)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / MODEL_DIR, trust_remote_code=True)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, msg=name)
    assert resumed.final_loss == pytest.approx(straight.final_loss)
    assert build_model(spec).config.mixers == ["ttt_linear", "ttt_linear"]


@pytest.mark.parametrize("backbone", ["llama", "mamba"])
def test_a_run_builds_its_backbone_with_the_mixer_in_every_layer(backbone: str) -> None:
    """Llama's block has a SwiGLU MLP after the mixer, Mamba's none; both are initialised N(0, 0.02);
    an attention mixer's state is its KV cache in either."""
    spec = RunSpec("attention", 32, 2, 2, MQARShape(16, 2), 1, 2, 1e-3, 0, 32, backbone=backbone)
    model = build_model(spec)
    assert type(model) is {"llama": MixerLlamaForCausalLM, "mamba": MixerMambaForCausalLM}[backbone]
    assert model.config.mixers == ["attention", "attention"]
    assert any(".mlp." in name for name, _ in model.named_parameters()) == (backbone == "llama")
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # keys and values: 2 x width numbers per token and layer
    assert state_size(model, 16) == StateSize(2 * (2 * 32 * 16), grows=True, at_length=16)


def test_a_backbone_not_offered_is_an_error_that_names_the_choices() -> None:
    message = re.escape("backbone must be one of ['llama', 'mamba'], got 'gpt2'")
    with pytest.raises(ValueError, match=message):
        RunSpec("attention", 32, 2, 2, MQARShape(16, 2), 1, 2, 1e-3, 0, 32, backbone="gpt2")
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CPU, backbone="gpt2")


@pytest.mark.parametrize(
    ("mixer", "exempt"),
    [("mamba", {"A_log", "D"}), ("gated_deltanet", {"A_log", "dt_bias"}), ("attention", set())],
)
def test_weight_decay_leaves_out_what_the_mixers_own_recipes_exempt(
    mixer: str, exempt: set[str], tmp_path: Path
) -> None:
    spec = RunSpec(mixer, 32, 1, 1, MQARShape(16, 2), 1, 2, 1e-3, 0, 32)
    model = build_model(spec)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    decayed = set(RecallTrainer(model=model, args=args).get_decay_parameter_names(model))
    mixer_params = {name.rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".self_attn." in name}
    assert mixer_params & exempt == exempt
    assert not any(name.rsplit(".", 1)[-1] in exempt for name in decayed)
    assert any(name.endswith("_proj.weight") for name in decayed)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--mixers", "attention,transformer"], "unknown mixer 'transformer'"),
        (["--widths", "30", "--heads", "4"], "not multiples of --heads"),
        (
            ["--seq-len", "8", "--kv-pairs", "4"],
            "--seq-len and --kv-pairs: seq_len 8 is below 4 * num_kv_pairs",
        ),
        (["--mixers", "gla,gla"], "--mixers names a value twice"),
        (["--seed", "-1"], "expected an integer >= 0"),
        (["--learning-rates", "0"], "learning rate must be in (0, 1)"),
        (["--steps", "-5"], "expected an integer >= 1, got '-5'"),
        (["--min-attention-accuracy", "1.5"], "--min-attention-accuracy must be in [0, 1]"),
        (["--checkpoints", "x/model,y/model,x/model"], "names a checkpoint twice"),
    ],
)
def test_bad_options_are_errors_that_name_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as error:
        main(["--out", str(tmp_path), *options])
    assert error.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_folder_holding_other_runs_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "runs" / "attention-d32-L16-kv2-lr0.003-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"mixer": "attention", "steps": 999}))
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), *TINY, "--mixers", "attention", "--learning-rates", "0.003"])
    assert "holds a run with other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_a_piped_run_writes_a_log_that_reads_top_to_bottom(tmp_path: Path) -> None:
    """Output to a file: plain lines, no carriage-return redraws of progress bars, no warnings."""
    log = tmp_path / "log.txt"
    tiny = [arg if arg != ",".join(ALL_MIXERS) else "attention,ttt_linear" for arg in TINY]
    out = str(tmp_path / "out")
    command = [
        sys.executable,
        "-m",
        "ttt_mixer.cli",
        "recall-gap",
        "--out",
        out,
        *tiny,
        "--min-attention-accuracy",
        "0",
    ]
    env = subprocess_env()
    with log.open("w") as output:
        subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env, check=True, timeout=600)
    text = log.read_text()
    assert "\r" not in text
    assert "warn" not in text.lower(), text
    assert re.search(r"^attention-\S+: done: 3/3$", text, re.M)
    assert "| ttt_linear |" in text


def test_training_stops_at_a_non_finite_loss(tmp_path: Path) -> None:
    """A diverged run raises before its optimiser step and saves no checkpoint."""
    from transformers import TrainingArguments

    from ttt_mixer.recall_gap.train import RecallTrainer
    from ttt_mixer.training import NonFiniteTrainingError

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    ids = torch.randint(0, 20, (8, 6))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        save_steps=1,
        report_to="none",
        use_cpu=True,
    )
    with pytest.raises(NonFiniteTrainingError, match="non-finite at step 1"):
        RecallTrainer(model=model, args=args, train_dataset=data).train()
    assert not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.slow
def test_two_processes_train_what_one_does(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` on CPU (gloo) trains at the stated global batch (the weights
    equal a single process's) and reports the same accuracies (the main process evaluates)."""
    plan = [
        *("--widths", "32", "--heads", "2", "--steps", "4", "--batch-size", "8", "--seq-len", "16"),
        *("--kv-pairs", "2", "--length-factors", "1", "--eval-samples", "4", "--save-steps", "2"),
        *("--mixers", "attention", "--min-attention-accuracy", "0"),
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {
        "one": [sys.executable, "-m", "ttt_mixer.cli", "recall-gap", "--jobs", "1"],
        "two": [*torchrun, "-m", "ttt_mixer.cli", "recall-gap"],
    }
    for name, command in runs.items():
        subprocess.run(
            [*command, "--out", str(tmp_path / name), *plan],
            env=subprocess_env(),
            check=True,
            timeout=600,
            capture_output=True,
        )
    weights = {
        name: load_file(next((tmp_path / name).glob("runs/*/model/model.safetensors"))) for name in runs
    }
    for key, value in weights["one"].items():
        torch.testing.assert_close(weights["two"][key], value, rtol=0, atol=1e-6, msg=key)
    tables = {name: json.loads((tmp_path / name / "recall_gap.json").read_text()) for name in runs}
    assert [row["accuracy"] for row in tables["two"]["rows"]] == [
        row["accuracy"] for row in tables["one"]["rows"]
    ]
    (run_dir,) = (tmp_path / "two" / "runs").iterdir()
    assert json.loads((run_dir / "train.json").read_text())["final_loss"] is not None


PARENT_KILLED_MID_RUN = """
import multiprocessing, os
from concurrent.futures import ProcessPoolExecutor
from ttt_mixer.recall_gap.runner import _exit_with_parent

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, context, _exit_with_parent, (os.getpid(),))
    print(pool.submit(os.getpid).result(), flush=True)
    os._exit(0)  # as a kill would: no cleanup, the worker is left running
"""


def _process_ended(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:  # a zombie has ended too; nobody may reap it here
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_worker_ends_itself_when_the_command_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_KILLED_MID_RUN)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr
    worker = int(result.stdout.split()[-1])
    deadline = time.monotonic() + 20
    while not _process_ended(worker):
        assert time.monotonic() < deadline, f"worker {worker} still runs 20 s after its parent was killed"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("text", "seeds"),
    [
        ("100-104", (100, 101, 102, 103, 104)),
        ("100,101,102", (100, 101, 102)),
        ("7, 3-4", (7, 3, 4)),
        ("0", (0,)),
    ],
)
def test_seeds_are_read_as_integers_and_ranges_in_the_given_order(text: str, seeds: tuple[int, ...]) -> None:
    assert seed_list(text) == seeds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a comma-separated list of integers >= 0 and ranges FIRST-LAST"),
        ("1,,2", "expected a comma-separated list"),
        ("-1", "expected a comma-separated list"),
        ("1-2-3", "expected a comma-separated list"),
        ("1.5", "expected a comma-separated list"),
        ("104-100", "the range '104-100' runs backwards"),
        ("1,0-2", "'1,0-2' names seed 1 twice"),
    ],
)
def test_a_bad_seed_list_is_an_error_that_shows_the_expected_form(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        seed_list(text)


def test_seeds_cannot_be_given_with_a_seed_or_with_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for options, message in (
        (["--seed", "1", "--seeds", "2-3"], "argument --seeds: not allowed with argument --seed"),
        (["--seeds", "5-2"], "argument --seeds: the range '5-2' runs backwards"),
        (["--seeds", "0,1", "--checkpoints", "x/model"], "--seeds trains each run per seed; --checkpoints"),
    ):
        with pytest.raises(SystemExit) as error:
            main(["--out", str(tmp_path), *options])
        assert error.value.code == 2
        assert message in capsys.readouterr().err
    for seeds in ((), (1, 1), (-1,)):
        with pytest.raises(ValueError, match="seeds must be distinct integers >= 0, at least one"):
            recall_gap(CPU, tmp_path / "api", seeds)
    assert not (tmp_path / "api").exists()


def test_over_seeds_gives_the_median_the_range_and_the_seeds_that_learned() -> None:
    shape, longer = MQARShape(32, 4), MQARShape(64, 8)
    per_seed = {  # seed: (accuracy at the training shape, at the longer shape)
        100: (0.99, 0.5),
        101: (0.95, 0.7),
        102: (0.23, 0.1),
        103: (0.90, 0.6),
        104: (0.97, 0.4),
    }

    def row(mixer: str, seed: int, accuracy: tuple[float, float], lr: float = 5e-3) -> Row:
        accuracies = dict(zip((shape, longer), accuracy, strict=True))
        return Row(
            mixer,
            f"/runs/{mixer}-{seed}",
            10,
            StateSize(64),
            accuracies,
            mixer,
            64,
            lr,
            shape,
            seed,
            seed=seed,
        )

    mamba = [row("mamba", seed, accuracy) for seed, accuracy in per_seed.items()]
    attention = [row("attention", seed, (1.0, 0.9), 1e-3) for seed in per_seed]
    groups = over_seeds([*mamba, *attention])
    assert [group.first.mixer for group in groups] == ["mamba", "attention"]
    assert groups[0].seeds == list(per_seed)
    assert groups[0].spread(shape) == Spread(0.95, 0.23, 0.99)
    assert groups[0].spread(longer) == Spread(0.5, 0.1, 0.7)
    # 0.90 is at the bar: learned
    assert groups[0].learned(0.9) == 4 and groups[1].learned(0.9) == 5
    assert groups[0].median_row().accuracy == {shape: 0.95, longer: 0.5}

    table = markdown_table([*mamba, *attention], learned_accuracy=0.9)
    assert "over 5 seeds; accuracy: median (range over the seeds)" in table
    assert "| learned (>= 0.9 at L32-kv4) |" in table
    assert (
        "| mamba | 0.005 | 10 | 64 | 4 of 5 seeds | 0.950 (0.230-0.990) | 0.500 (0.100-0.700) | 102 s |"
        in table
    )
    assert "| attention | 0.001 | 10 | 64 | 5 of 5 seeds | 1.000 | 0.900 | 102 s |" in table
    assert "Not learned (below 0.9 at the training shape): mamba seed 102 (0.230)." in table

    record = groups[0].to_json(0.9)
    assert record["learned_seeds"] == 4 and record["seeds"] == list(per_seed)
    assert record["accuracy"]["L32-kv4"] == {
        "median": 0.95,
        "low": 0.23,
        "high": 0.99,
        "per_seed": {str(seed): accuracy[0] for seed, accuracy in per_seed.items()},
    }
    with pytest.raises(ValueError, match="one row per seed"):
        over_seeds([mamba[0], mamba[0]])


def test_several_seeds_are_planned_and_started_seed_by_seed() -> None:
    preset = dataclasses.replace(CPU, mixers=("attention", "mamba"))
    specs = plan(preset, (7, 3))
    assert [(spec.seed, spec.mixer) for spec in specs] == [
        (7, "attention"),
        (7, "mamba"),
        (3, "attention"),
        (3, "mamba"),
    ]
    assert len({spec.name for spec in specs}) == 4
    # each seed's runs before the next seed's, the costlier mixer (mamba) first within a seed
    assert start_order(specs) == [1, 0, 3, 2]


@pytest.mark.slow
def test_a_run_over_two_seeds_reports_both_and_a_one_seed_rerun_reuses_its_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    tiny = [arg if arg != ",".join(ALL_MIXERS) else "attention" for arg in TINY]
    tiny = [
        *tiny,
        "--eval-samples",
        "1",
        "--length-factors",
        "1",
        "--min-attention-accuracy",
        "0",
        "--jobs",
        "1",
    ]
    main(["--out", str(out), *tiny, "--seeds", "3-4"])
    data = json.loads((out / TABLE_JSON).read_text())
    assert data["seeds"] == [3, 4] and [row["seed"] for row in data["rows"]] == [3, 4]
    (group,) = data["over_seeds"]
    per_seed = {str(row["seed"]): row["accuracy"]["L16-kv2"] for row in data["rows"]}
    assert group["seeds"] == [3, 4] and group["accuracy"]["L16-kv2"]["per_seed"] == per_seed
    assert group["accuracy"]["L16-kv2"]["median"] == pytest.approx(sum(per_seed.values()) / 2)
    assert "over 2 seeds" in (out / TABLE_MD).read_text() and "of 2 seeds |" in capsys.readouterr().out
    assert (out / PLOT_PNG).stat().st_size > 10_000  # the medians
    runs = sorted(path.name for path in (out / "runs").iterdir())
    assert runs == [f"attention-d32-L16-kv2-lr{CPU.learning_rates['attention']:g}-seed{s}" for s in (3, 4)]

    trained = {path: path.stat().st_mtime_ns for path in out.rglob("model.safetensors")}
    main(["--out", str(out), *tiny, "--seed", "4"])
    single = json.loads((out / TABLE_JSON).read_text())
    assert "over_seeds" not in single and single["seeds"] == [4]
    assert single["rows"][0]["accuracy"]["L16-kv2"] == per_seed["4"]
    assert {path: path.stat().st_mtime_ns for path in out.rglob("model.safetensors")} == trained
