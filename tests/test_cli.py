"""The ``ttt-mixer demo`` command (the interim main job) trains, generates and times decoding."""

import argparse
import re
from pathlib import Path

import pytest

from ttt_mixer.cli import main


def test_demo_trains_generates_and_times_decoding(capsys: pytest.CaptureFixture) -> None:
    main(["demo", "--train-steps", "3", "--new-tokens", "5", "--hidden-size", "32", "--layers", "1"])
    out = capsys.readouterr().out
    assert re.search(r"trained 3 steps .* loss \d+\.\d+", out)
    assert "generated 5 tokens" in out
    times = [float(ms) for ms in re.findall(r"context: (\d+\.\d+) ms/token", out)]
    assert len(times) == 2 and all(t > 0 for t in times)


# The command line's help and tasks-path must not import these (issue 27: each took 9-11 s, 8.3 s of
# it fla's import); benchmarks/bench_startup.py times them against the 1.5 s.
HEAVY_MODULES = ("torch", "transformers", "fla", "lm_eval", "datasets", "matplotlib", "triton")
# eval's help is lm-eval's, printed by lm-eval's own parser (it imports lm-eval)
LM_EVAL_HELP = ("eval",)
# seconds one help may take in a fresh process in the tests: the benchmark's bound (1.5 s) with room
# for a busy machine, yet under a third of what importing the library takes (swap's help took 13 s
# when it imported the mixers)
HELP_SECONDS_BOUND = 5.0


def _help_commands() -> list[list[str]]:
    """``--help``, ``tasks-path`` and every subcommand's ``--help``."""
    from ttt_mixer.cli import build_parser

    names = build_parser()._subparsers._group_actions[0].choices
    return [["--help"], ["tasks-path"], *([name, "--help"] for name in names if name != "tasks-path")]


@pytest.mark.slow
def test_help_and_tasks_path_import_no_heavy_dependency() -> None:
    import json
    import subprocess
    import sys

    from conftest import subprocess_env

    commands = [argv for argv in _help_commands() if argv[0] not in LM_EVAL_HELP]
    assert ["swap", "--help"] in commands  # the mixer registry is read without importing a mixer
    script = (
        "import contextlib, io, json, sys\n"
        "import ttt_mixer_cli\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        ttt_mixer_cli.main(argv)\n"
        f"heavy = [name for name in {HEAVY_MODULES!r} if name in sys.modules]\n"
        # the packages' names still load on first use, with transformers' model types kept
        "import ttt_mixer, ttt_mixer.adapters\n"
        "from transformers import AutoConfig, MambaConfig\n"
        "config_class = ttt_mixer.TTTConfig  # the first use\n"
        "registered = type(AutoConfig.for_model(config_class.model_type)) is config_class\n"
        "mixer_config = ttt_mixer.adapters.MixerLlamaConfig  # the adapters' first use\n"
        "registered = registered and type(AutoConfig.for_model(mixer_config.model_type)) is mixer_config\n"
        "kept = type(AutoConfig.for_model('mamba')) is MambaConfig\n"
        "print(json.dumps({'heavy': heavy, 'registered': registered, 'mamba_kept': kept}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr.lower(), result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"heavy": [], "registered": True, "mamba_kept": True}, report


@pytest.mark.slow
def test_every_help_and_tasks_path_starts_within_the_bound() -> None:
    """Each in a fresh process, as the ``ttt-mixer`` script starts it (its launcher's main)."""
    import subprocess
    import sys
    import time

    from conftest import subprocess_env

    launcher = "import sys, ttt_mixer_cli; ttt_mixer_cli.main(sys.argv[1:])"
    slow = {}
    for argv in _help_commands():
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", launcher, *argv], env=subprocess_env(), capture_output=True, timeout=120
        )
        seconds = time.perf_counter() - start
        assert result.returncode == 0, (argv, result.stderr.decode())
        assert result.stdout, argv
        if seconds > HELP_SECONDS_BOUND:
            slow[" ".join(argv)] = round(seconds, 2)
    assert not slow, f"over {HELP_SECONDS_BOUND} s: {slow}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from ttt_mixer.cli import build_parser

    return dict(build_parser()._subparsers._group_actions[0].choices)


def test_every_option_has_help_that_shows_its_default() -> None:
    from ttt_mixer.arguments import HelpFormatter

    for name, parser in _subcommands().items():
        if name == "eval":  # lm-eval's options, which its own help explains
            continue
        assert parser.description, f"ttt-mixer {name} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"ttt-mixer {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            if action.option_strings:
                shown = HelpFormatter(name)._get_help_string(action)
                assert action.required or "default" in shown, f"{where}: its help shows no default"


def test_help_texts_carry_no_markup() -> None:
    from ttt_mixer.cli import DESCRIPTION, EVAL_EPILOG

    texts = [DESCRIPTION, EVAL_EPILOG]
    for parser in _subcommands().values():
        texts += [parser.description or ""] + [action.help or "" for action in parser._actions]
    marked = [text for text in texts if "``" in text or ":func:" in text or "`" in text]
    assert not marked, marked


def test_eval_help_adds_the_projects_tasks(capsys: pytest.CaptureFixture) -> None:
    main(["eval", "--help"])
    out = capsys.readouterr().out
    assert out.index("lm-eval") < out.index("ttt-mixer's tasks")  # lm-eval's help, then ours
    for name in (
        "ttt_mqar",
        "ttt_passkey",
        "ttt_set_disjointness",
        "ttt_ppl_position",
        "--metadata",
        "context_lengths",
        "ppl_files",
        "sd_lengths",
    ):
        assert name in out, name


def test_eval_help_gives_every_task_option_with_its_default() -> None:
    """The help's list of --metadata options is written by hand: it must name every option of
    every group (``OPTION_GROUPS``) as ``name (default``."""
    import json

    from ttt_mixer.cli import EVAL_EPILOG
    from ttt_mixer.eval_tasks.options import OPTION_GROUPS

    for group in OPTION_GROUPS.values():
        for name, default in group.defaults.items():
            shown = "none" if default is None else json.dumps(default)
            assert f"{name} ({shown}" in EVAL_EPILOG, name


def test_byte_tokenizer_maps_each_byte_to_its_value_and_back(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from ttt_mixer.tokenizer import byte_tokenizer

    text = "héllo Ā wörld\n\x00\ttabs"
    tokenizer = byte_tokenizer()
    ids = tokenizer(text).input_ids
    assert ids == list(text.encode())
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 257 and tokenizer.eos_token_id == tokenizer.pad_token_id == 256
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == ids


@pytest.mark.slow
def test_demo_saves_a_checkpoint_with_its_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    main(
        [
            "demo",
            "--train-steps",
            "1",
            "--new-tokens",
            "3",
            "--hidden-size",
            "32",
            "--layers",
            "1",
            "--save",
            str(tmp_path / "m"),
        ]
    )
    assert "the prompt, then [the greedy continuation" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--model", "hf", "--model_args", "pretrained={folder}", "--tasks", "ttt_mqar"],
        ["distill", "{folder}", "{folder}", "{out}", "--text", "{text}"],
    ],
    ids=["eval", "distill"],
)
def test_a_checkpoint_without_tokenizer_is_named_with_the_fix(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (tmp_path / "text.txt").write_text("some text")
    values = {"folder": folder, "out": tmp_path / "out", "text": tmp_path / "text.txt"}
    with pytest.raises(SystemExit) as exit:
        main([arg.format(**values) for arg in argv])
    assert exit.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{folder} has no tokenizer" in line and "byte_tokenizer().save_pretrained" in line


def test_eval_tells_lm_eval_our_checkpoints_are_causal(tmp_path: Path) -> None:
    # lm-eval's HFLM warns that it does not know a model type that transformers does not list
    import json

    from ttt_mixer.cli import _causal_backend_for_ours

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder, config in (
        (ours, {"model_type": "ttt_mixer", "auto_map": {}}),
        (theirs, {"model_type": "llama"}),
    ):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    args = ["--model", "hf", "--model_args", f"pretrained={ours}"]
    assert (
        _causal_backend_for_ours(args, {"pretrained": str(ours)})[-1] == f"pretrained={ours},backend=causal"
    )
    given = {"pretrained": str(ours), "backend": "seq2seq"}
    assert _causal_backend_for_ours(args, given) == args  # the user's choice stands
    args = ["--model_args", f"pretrained={theirs}"]
    assert _causal_backend_for_ours(args, {"pretrained": str(theirs)}) == args
