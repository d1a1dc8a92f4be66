"""The README's Python examples run as written (in order, sharing one namespace)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["o"].shape == (2, 100, 256)
    assert namespace["out"].shape == (2, 48)
    assert type(namespace["reloaded"]).__name__ == "TTTForCausalLM"
    assert namespace["hybrid"].config.mixers == ["attention", "ttt_linear", "attention", "ttt_linear"]
    assert namespace["generated"].shape == (1, 11)
