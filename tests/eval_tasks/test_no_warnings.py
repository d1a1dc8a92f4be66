"""lm-eval's own runner over ttt-mixer's tasks prints none of the warnings our tasks could cause: a
metric without an aggregation or a direction (the per-length acc@L and exact_match@L, ppl@a-b,
ttt_ppl_rolling's perplexities) and transformers' "exceeded the model's predefined maximum length"
(a checkpoint whose max_position_embeddings covers the lengths evaluated)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from eval_models import character_tokenizer, save_checkpoint, tiny_model

from ttt_mixer.eval_tasks import tasks_path

pytestmark = [pytest.mark.slow, pytest.mark.compat]  # lm-eval in a subprocess

OUR_WARNINGS = (
    "No aggregation function defined",
    "aggregation is not",
    "higher_is_better is not",
    "predefined maximum length",
)


def test_lm_eval_on_our_tasks_prints_no_warning_of_ours(tmp_path: Path) -> None:
    tokenizer = character_tokenizer()
    checkpoint = save_checkpoint(tiny_model("ttt", tokenizer), tokenizer, tmp_path / "ttt")
    (tmp_path / "doc.txt").write_text("Test-time training makes the hidden state a model. " * 6)
    metadata = {
        "context_lengths": [192, 256],
        "mqar_seq_lengths": [16, 24],
        "mqar_num_kv_pairs": 2,
        "sd_lengths": [6, 10],
        "num_samples": 1,
        "ppl_files": str(tmp_path / "doc.txt"),
        "ppl_bucket_edges": [0, 64, 128],
    }
    command = [
        *(
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={checkpoint},trust_remote_code=True",
        ),
        *("--tasks", "ttt_recall_synthetic,ttt_ppl", "--include_path", tasks_path()),
        *("--metadata", json.dumps(metadata), "--device", "cpu", "--batch_size", "2"),
        *("--output_path", str(tmp_path / "out")),
    ]
    result = subprocess.run(
        command, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "acc@16" in output and "ppl@0-64" in output and "word_perplexity" in output
    found = [line for line in output.splitlines() if any(w in line for w in OUR_WARNINGS)]
    assert not found, "\n".join(found)
