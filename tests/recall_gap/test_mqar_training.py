"""The ``ttt_mqar`` task measures recall: a tiny attention model trained here on MQAR sequences
rendered exactly as the task renders them (``recall.mqar_sequence``, symbols joined by spaces) scores
far above chance through the real ``lm_eval`` command line, and an untrained model, whose outputs
are noise, scores near chance (1 / mqar_num_kv_pairs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ttt_mixer.eval_tasks import recall, tasks_path
from ttt_mixer.recall_gap.data import mqar_tokenizer

pytestmark = pytest.mark.slow  # training or subprocesses

SEQ_LEN, NUM_KV_PAIRS = 32, 4
CHANCE = 1 / NUM_KV_PAIRS
# 25 sequences x 4 queries = 100 documents, drawn from the task's own seed (not the training one)
METADATA = {"mqar_seq_lengths": [SEQ_LEN], "mqar_num_kv_pairs": NUM_KV_PAIRS, "num_samples": 25}
LIMIT = 25 * NUM_KV_PAIRS
# the loss falls sharply around step 250 (associative recall forms) and the accuracy is ~0.94 at 500
STEPS, BATCH, LR, SEED = 500, 64, 3e-3, 0


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * SEQ_LEN,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def training_data(tokenizer: PreTrainedTokenizerFast) -> tuple[torch.Tensor, torch.Tensor]:
    """``STEPS * BATCH`` sequences from the task's generator and, as Zoology trains, targets only at
    the queries: the value bound to the key just read (-100 elsewhere)."""
    rng = np.random.default_rng([SEED, 2024])  # the task draws from seed 1234: no document repeats
    vocab = tokenizer.get_vocab()
    inputs = torch.empty(STEPS * BATCH, SEQ_LEN, dtype=torch.long)
    targets = torch.full_like(inputs, -100)
    for row in range(STEPS * BATCH):
        sequence = recall.mqar_sequence(rng, SEQ_LEN, NUM_KV_PAIRS, recall.OPTION_DEFAULTS["mqar_power_a"])
        inputs[row] = torch.tensor([vocab[s] for s in sequence.symbols])
        for position, answer in zip(sequence.query_positions, sequence.answers, strict=True):
            targets[row, position] = vocab[answer]
    return inputs, targets


def train(model: LlamaForCausalLM, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """AdamW with a one-cycle schedule, one pass over the data; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    model.train()
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        logits = model(inputs[rows]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return loss.item()


def lm_eval_command(checkpoint: Path, output: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={checkpoint}"),
        *("--tasks", "ttt_mqar", "--include_path", tasks_path(), "--metadata", json.dumps(METADATA)),
        *("--limit", str(LIMIT), "--device", "cpu", "--batch_size", "16", "--output_path", str(output)),
    ]


def accuracy(output: Path) -> float:
    (results_file,) = output.rglob("results*.json")
    return json.loads(results_file.read_text())["results"]["ttt_mqar"][f"acc@{SEQ_LEN},none"]


def test_a_model_trained_on_mqar_recalls_and_noise_stays_at_chance(tmp_path: Path) -> None:
    tokenizer = mqar_tokenizer()
    env = subprocess_env(OMP_NUM_THREADS="1")

    # the untrained model is scored in the background while the other one trains
    noise, trained = tmp_path / "noise", tmp_path / "trained"
    tiny_llama(len(tokenizer)).save_pretrained(noise)
    tokenizer.save_pretrained(noise)
    noise_run = subprocess.Popen(
        lm_eval_command(noise, tmp_path / "noise-results"),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        model = tiny_llama(len(tokenizer))
        loss = train(model, *training_data(tokenizer))
        model.save_pretrained(trained)
        tokenizer.save_pretrained(trained)
        result = subprocess.run(
            lm_eval_command(trained, tmp_path / "trained-results"),
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        _, noise_stderr = noise_run.communicate(timeout=600)
    finally:
        noise_run.kill()
        noise_run.wait()
    assert noise_run.returncode == 0, noise_stderr[-3000:]

    trained_acc, noise_acc = accuracy(tmp_path / "trained-results"), accuracy(tmp_path / "noise-results")
    print(f"acc@{SEQ_LEN}: trained {trained_acc:.3f} (final loss {loss:.3f}), noise {noise_acc:.3f}")
    assert trained_acc >= 0.6, (trained_acc, loss)
    assert abs(noise_acc - CHANCE) <= 0.2 and noise_acc <= 0.45, noise_acc
