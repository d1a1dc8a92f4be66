"""The wheel built from the tree holds every module and task file: ``ttt_mixer/`` as it is, the
top-level ``adapters/`` and ``eval_tasks/`` folders as ``ttt_mixer.adapters`` and ``ttt_mixer.eval_tasks``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# tree folder -> its package path inside the wheel
INSTALLED_AS = {
    "ttt_mixer": "ttt_mixer",
    "adapters": "ttt_mixer/adapters",
    "eval_tasks": "ttt_mixer/eval_tasks",
}


def tree_files() -> set[str]:
    """Every .py and .yaml file of the three folders, named as the wheel must hold it."""
    files = set()
    for folder, package in INSTALLED_AS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                files.add(f"{package}/{path.relative_to(ROOT / folder).as_posix()}")
    return files


@pytest.mark.slow
def test_wheel_holds_every_module_and_task_file(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT)],
        cwd=tmp_path,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("ttt_mixer-*.whl")
    missing = tree_files() - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, f"the wheel lacks {sorted(missing)}"
