"""The ``ttt-mixer demo`` command (the interim main job) trains, generates and times decoding."""

import re

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
# it fla's import); benchmarks/bench_startup.py times them.
HEAVY_MODULES = ("torch", "transformers", "fla", "lm_eval", "datasets", "matplotlib", "triton")


@pytest.mark.slow
def test_help_and_tasks_path_import_no_heavy_dependency() -> None:
    import json
    import subprocess
    import sys

    from conftest import subprocess_env

    from ttt_mixer.cli import build_parser

    commands = [name for name in build_parser()._subparsers._group_actions[0].choices if name != "eval"]
    script = (
        "import contextlib, io, json, sys\n"
        "import ttt_mixer_cli\n"
        "for argv in [['--help'], ['tasks-path'], *([name, '--help'] for name in sys.argv[1:])]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        ttt_mixer_cli.main(argv)\n"
        f"heavy = [name for name in {HEAVY_MODULES!r} if name in sys.modules]\n"
        # the package's names still load on first use, with transformers' model types kept
        "import ttt_mixer\n"
        "from transformers import AutoConfig, MambaConfig\n"
        "config_class = ttt_mixer.TTTConfig  # the first use\n"
        "registered = type(AutoConfig.for_model(config_class.model_type)) is config_class\n"
        "kept = type(AutoConfig.for_model('mamba')) is MambaConfig\n"
        "print(json.dumps({'heavy': heavy, 'registered': registered, 'mamba_kept': kept}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *commands],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"heavy": [], "registered": True, "mamba_kept": True}, report


def test_swap_choices_are_the_adapters() -> None:
    from ttt_mixer.adapters import MIXER_NAMES
    from ttt_mixer.adapters.swap import INITS
    from ttt_mixer.cli import SWAP_INITS, SWAP_MIXERS

    assert SWAP_MIXERS == MIXER_NAMES
    assert SWAP_INITS == INITS
