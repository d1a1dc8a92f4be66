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
