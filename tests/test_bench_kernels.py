"""CPU checks of benchmarks/bench_kernels.py, the GPU benchmark of the TTT kernels: its arguments, its
plan, and its report (targets, markdown, JSON) on made-up timings. The timings themselves need a GPU
(benchmarks/gpu_check.sh)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_dry_run_prints_the_plan(bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "--out",
        str(tmp_path),
        "--dry-run",
        "--lengths",
        "1024",
        "4096",
        "--rows",
        "ttt-linear",
        "attention",
    ]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "ttt-linear (ours, Triton): T = 1024, B = 32, H = 16, d = 64",
        "ttt-linear (ours, Triton): T = 4096, B = 8, H = 16, d = 64",
        "ttt-linear (ours, PyTorch): T = 1024, B = 32, H = 16, d = 64",
        "ttt-linear (ours, PyTorch): T = 4096, B = 8, H = 16, d = 64",
        "attention (SDPA flash): T = 1024, B = 32, H = 16, d = 64",
        "attention (SDPA flash): T = 4096, B = 8, H = 16, d = 64",
    ]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--out", "x", "--lengths", "0"],
        ["--out", "x", "--repeats", "0"],
        ["--out", "x", "--dtype", "fp64"],
    ],
    ids=["no-out", "zero-length", "zero-repeats", "bad-dtype"],
)
def test_rejects_bad_arguments(bench, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as error:
        bench.parse_args(argv)
    assert error.value.code == 2


def test_report_checks_the_targets(bench, tmp_path: Path) -> None:
    settings, _, _ = bench.parse_args(["--out", str(tmp_path), "--lengths", "1024", "4096", "8192"])
    fb = "forward+backward"
    timings = {
        ("ttt-linear (ours, Triton)", fb): 1.0,
        ("ttt-linear (ours, PyTorch)", fb): 50.0,
        ("ttt-mlp (ours, Triton)", fb): 4.0,  # more than 3x TTT-Linear
        ("fla chunk_ttt_linear", fb): 2.0,
        ("attention (SDPA flash)", fb): 3.0,
        ("ttt-linear (ours, Triton)", "decode step"): 0.1,
    }
    rows = []
    for (name, mode), ms in timings.items():
        row = bench.Row(name, mode)
        row.ms = {T: ms for T in settings.lengths}
        row.tflops = {T: 1.0 for T in settings.lengths}
        rows.append(row)
    rows[0].ms[1024], rows[0].tflops[1024], rows[0].errors[1024] = None, None, "OutOfMemoryError: x"
    targets = {t["target"]: t["holds"] for t in bench.check_targets(rows)}
    assert targets["TTT-Linear fwd+bwd at T = 8k at least as fast as fla chunk_ttt_linear"] is True
    assert targets["TTT-Linear fwd+bwd faster than attention fwd+bwd at T = 4096"] is True
    assert targets["TTT-Linear fwd+bwd faster than attention fwd+bwd at T = 16384"] is None  # not measured
    assert targets["TTT-linear fwd+bwd at least 20x our PyTorch path at T = 8192"] is True
    assert targets["TTT-linear fwd+bwd at least 20x our PyTorch path at T = 1024"] is None  # failed
    assert targets["TTT-MLP fwd+bwd within 3x of TTT-Linear at T = 8k"] is False
    assert targets["ttt-linear (ours, Triton) decode time per token flat from 1k to 32k (max / min <= 1.2)"]

    bench.write_report(tmp_path, settings, rows, bench.check_targets(rows), seconds=12.0)
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["settings"]["lengths"] == [1024, 4096, 8192]
    assert report["rows"][0]["errors"] == {"1024": "OutOfMemoryError: x"}
    table = (tmp_path / "kernels.md").read_text()
    assert (
        "| ttt-linear (ours, Triton) | forward+backward | error | 1.000 ms / 1.0 | 1.000 ms / 1.0 |" in table
    )
    assert "- ttt-linear (ours, Triton), forward+backward, T = 1024: OutOfMemoryError: x" in table
