"""The README runs as printed. Every Python block runs alone in a fresh interpreter, prints no
warning and gives what the README says; then every block, Python and shell, runs in the README's
order in one folder holding the repository's docs/ (the texts the examples read), as a newcomer
would after set-up, at tiny sizes (``TINY``: each replacement must still match the README). A block
is skipped only where the README marks it with ``<!-- readme-test: skip (REASON) -->``. Every
command the package installs is in the README."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from ttt_mixer.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((?P<reason>[^)]+)\) -->\n$")
FENCE = re.compile(r"```(?P<kind>python|bash)\n(?P<code>.*?)```", flags=re.DOTALL)


def readme_blocks() -> list[tuple[str, str, str | None]]:
    """(kind, code, skip reason or None) of every python and bash block, in the README's order."""
    text = README.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].splitlines(keepends=True)
        marker = SKIP.search(before[-1]) if before else None
        blocks.append((match["kind"], match["code"], marker["reason"] if marker else None))
    return blocks


BLOCKS = [code for kind, code, _ in readme_blocks() if kind == "python"]
# what each Python block must have made, checked after it in the same interpreter
EXPECTED = [
    "assert len(tokenizer) == 257 and Path('tiny-ttt', 'tokenizer.json').is_file()",
    "assert o.shape == (2, 100, 256) and o2.shape == (2, 1, 256)",
    "assert out.shape == (2, 48) and type(reloaded).__name__ == 'TTTForCausalLM'",
    "assert hybrid.config.mixers == ['attention', 'ttt_linear', 'attention', 'ttt_linear']\n"
    "assert generated.shape == (1, 11) and Path('llama', 'tokenizer.json').is_file()",
    "assert e2e_out.shape == (2, 22) and type(reloaded).__name__ == 'E2EForCausalLM'",
]
# README text -> the tiny size the walk-through runs instead (the README's sizes take minutes)
TINY = {
    "ttt-mixer demo --save my-ttt": "ttt-mixer demo --save my-ttt --train-steps 2 --new-tokens 4 --hidden-size 32",
    "--layerwise-steps 30": "--layerwise-steps 2",
    '"num_samples": 5': '"num_samples": 1',
    '"ppl_files": "docs/*.md"': '"ppl_files": "docs/README.md"',
}
# what the walk-through must leave in its folder
MADE = [
    "my-ttt/tokenizer.json",
    "tiny-ttt/config.json",
    "tiny-e2e/config.json",
    "llama/tokenizer.json",
    "hybrid/tokenizer.json",
    "llama-e2e/tokenizer.json",
]
MADE += ["distilled/config.json", "results/*/results_*.json", "plots/*.png"]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(EXPECTED)))
def test_readme_python_block_runs_alone_without_warnings(index: int, tmp_path: Path) -> None:
    assert len(BLOCKS) == len(EXPECTED), "a README block without its expectation here"
    result = subprocess.run(
        [sys.executable, "-c", "from pathlib import Path\n" + BLOCKS[index] + "\n" + EXPECTED[index]],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr.lower(), result.stderr


def test_skipped_blocks_are_only_the_marked_ones() -> None:
    reasons = [reason for _, _, reason in readme_blocks() if reason]
    assert reasons == [
        "the main job and the whole test suite; CI runs them on their own",
        "installs; the README test runs in the environment it installs",
        "installs; the README test runs in the environment it installs",
        "needs a checkpoint of the authors' code",
        "needs a checkpoint of the authors' code",
    ]


@pytest.mark.slow
def test_readme_runs_top_to_bottom_as_printed(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    env = subprocess_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # ttt-mixer, lm_eval
    unused = set(TINY)
    for kind, code, reason in readme_blocks():
        if reason:
            continue
        if kind == "bash":
            for text, tiny in TINY.items():
                if text in code:
                    code = code.replace(text, tiny)
                    unused.discard(text)
            command = ["bash", "-euo", "pipefail", "-c", code]
        else:
            command = [sys.executable, "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{code}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert not unused, f"TINY replacements the README no longer matches: {unused}"
    missing = [pattern for pattern in MADE if not list(tmp_path.glob(pattern))]
    assert not missing, missing


def test_every_command_is_in_the_readme() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices
    text = README.read_text()
    missing = [name for name in commands if f"ttt-mixer {name}" not in text]
    assert not missing, f"commands the README does not show: {missing}"
