"""Every Python block of the README runs as printed, each in a fresh interpreter, prints no warning,
and gives what the README says; every command the package installs is in the README."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from ttt_mixer.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
# what each block must have made, checked after it in the same interpreter
EXPECTED = [
    "assert o.shape == (2, 100, 256) and o2.shape == (2, 1, 256)",
    "assert out.shape == (2, 48) and type(reloaded).__name__ == 'TTTForCausalLM'",
    "assert hybrid.config.mixers == ['attention', 'ttt_linear', 'attention', 'ttt_linear']\n"
    "assert generated.shape == (1, 11)",
]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(EXPECTED)))
def test_readme_python_block_runs_alone_without_warnings(index: int, tmp_path: Path) -> None:
    assert len(BLOCKS) == len(EXPECTED), "a README block without its expectation here"
    env = subprocess_env()
    result = subprocess.run(
        [sys.executable, "-c", BLOCKS[index] + "\n" + EXPECTED[index]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr.lower(), result.stderr


def test_every_command_is_in_the_readme() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices
    text = README.read_text()
    missing = [name for name in commands if f"ttt-mixer {name}" not in text]
    assert not missing, f"commands the README does not show: {missing}"
