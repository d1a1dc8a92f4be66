"""The inner learning rate's warm-up (``ttt_mixer.e2e.warmup``): the authors' schedule over outer
steps, the forward running at the config's rate of the moment, and the Trainer callback setting it
for each optimiser step (once per step, whatever the gradient accumulation) and leaving the target
rate in the config between steps and after training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from ttt_mixer.e2e import E2EConfig, E2EForCausalLM
from ttt_mixer.e2e.warmup import InnerLrWarmup, warmed_up_inner_lr

TINY = {
    "vocab_size": 37,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mini_batch_size": 4,
    "sliding_window_size": 8,
    "suffix_len": 1,
    "inner_clip_gradient": 0.0,
    "initializer_range": 0.2,
    "bos_token_id": None,
    "eos_token_id": None,
}
# float64, one set of weights in two model instances (docs/conventions.md section 6)
SAME_MODEL_TOLERANCE = 1e-12


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def test_the_rate_follows_the_authors_schedule() -> None:
    # their pre-training configs' ilr_init 0.1 towards inner lr 1; step s runs at (s + 1) / warmup_steps
    # of the way, so the last warm-up step already runs at the full rate
    rates = [warmed_up_inner_lr(step, 1.0, 0.1, 4) for step in range(6)]
    assert rates == pytest.approx([0.325, 0.55, 0.775, 1.0, 1.0, 1.0], abs=1e-15)
    assert warmed_up_inner_lr(0, 1.0, 0.1, 0) == 1.0  # no warm-up: their default
    for bad, error, words in (
        ({"step": -1}, ValueError, "step must be an int >= 0"),
        ({"warmup_steps": 2.5}, TypeError, "warmup_steps must be an int >= 0"),
        ({"ilr_init": float("nan")}, ValueError, "ilr_init must be a finite number >= 0"),
        ({"inner_lr": -1.0}, ValueError, "inner_lr must be a finite number >= 0"),
    ):
        arguments = {"step": 0, "inner_lr": 1.0, "ilr_init": 0.1, "warmup_steps": 4} | bad
        with pytest.raises(error, match=words):
            warmed_up_inner_lr(**arguments)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        InnerLrWarmup(ilr_init=0.1, warmup_steps=-1)


def test_the_forward_runs_at_the_configs_rate_of_the_moment() -> None:
    torch.manual_seed(0)
    model = E2EForCausalLM(E2EConfig(**TINY)).double().eval()
    reference = E2EForCausalLM(E2EConfig(**TINY, inner_lr=0.3)).double().eval()
    reference.load_state_dict(model.state_dict())
    ids = tokens(2, 12)
    with torch.no_grad():
        full = model(ids).logits
        model.config.inner_lr = 0.3
        warming = model(ids).logits
        expected = reference(ids).logits
    torch.testing.assert_close(warming, expected, rtol=0, atol=SAME_MODEL_TOLERANCE)
    assert (warming[:, 4:] - full[:, 4:]).abs().amax() > 1e-3  # after the first inner step


def test_the_trainer_callback_sets_the_rate_of_each_step_and_restores_the_target(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = E2EForCausalLM(E2EConfig(**TINY, inner_lr=1.0))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.config.inner_lr))
    ids = tokens(16, 12)
    data = [{"input_ids": row, "labels": row} for row in ids]
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    callback = InnerLrWarmup(ilr_init=0.1, warmup_steps=3)
    Trainer(model=model, args=arguments, train_dataset=data, callbacks=[callback]).train()
    # two forwards (accumulated micro-batches) per optimiser step, both at that step's rate
    expected = [rate for step in range(4) for rate in [warmed_up_inner_lr(step, 1.0, 0.1, 3)] * 2]
    assert seen == pytest.approx(expected, abs=1e-15)
    assert seen[0] == pytest.approx(0.4) and seen[-1] == 1.0
    assert model.config.inner_lr == 1.0
