"""``torchrun --nproc_per_node 2 -m ttt_mixer.cli distill`` on CPU (gloo) distils what one process
does: each of the two takes half of every global batch, and the distilled weights equal a single
process's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from eval_models import character_tokenizer, save_checkpoint, tiny_model
from safetensors.torch import load_file

from ttt_mixer.cli import main

pytestmark = pytest.mark.slow  # subprocesses

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


def test_two_processes_distil_what_one_does(tmp_path: Path) -> None:
    tokenizer = character_tokenizer()
    teacher = save_checkpoint(tiny_model("llama", tokenizer), tokenizer, tmp_path / "teacher")
    student = tmp_path / "student"
    swap = ["swap", str(teacher), str(student), "--mixer", "ttt_linear", "--layers", "every:2"]
    main([*swap, "--init", "attention", "--option", "mini_batch_size=8"])
    (tmp_path / "text.txt").write_text(TEXT)
    options = [
        *("--text", str(tmp_path / "text.txt"), "--seq-len", "32", "--batch-size", "4"),
        *("--layerwise-steps", "4", "--finetune-steps", "3", "--lr", "3e-3"),
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {"one": [sys.executable], "two": torchrun}
    for name, launcher in runs.items():
        subprocess.run(
            [
                *launcher,
                "-m",
                "ttt_mixer.cli",
                "distill",
                str(teacher),
                str(student),
                str(tmp_path / name),
                *options,
            ],
            env=subprocess_env(),
            check=True,
            timeout=600,
            capture_output=True,
        )
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in runs}
    student_weights = load_file(student / "model.safetensors")
    changed = [key for key, value in weights["one"].items() if not torch.equal(value, student_weights[key])]
    assert changed and all(".self_attn." in key for key in changed)  # only the swapped mixer trained
    # two processes average two half-batch gradients where one process takes the mean over the whole
    # batch: the same sum in another order, float32 rounding (about 1e-7) that seven Adam steps of
    # lr 3e-3 keep far below 1e-5
    for key, value in weights["one"].items():
        torch.testing.assert_close(weights["two"][key], value, rtol=0, atol=1e-5, msg=key)
