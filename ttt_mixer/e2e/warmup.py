"""The inner learning rate's warm-up over outer training steps, as the TTT-E2E authors meta-train
(their ``MetaModel.get_ilr_multiplier`` in ``ttt/model/transformer.py``; docs/math.md section 16):
outer step ``s`` (from 0) takes its inner steps at ``ilr_init + (inner_lr - ilr_init) * min(1, (s +
1) / warmup_steps)``, and at ``inner_lr`` from the start when ``warmup_steps`` is 0. The forward reads
``config.inner_lr`` at every call, so the schedule sets that field per step: ``warmed_up_inner_lr``
for a hand-written loop, ``InnerLrWarmup`` for transformers' ``Trainer``."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ttt_mixer.e2e.configuration_e2e import check_non_negative_float
from ttt_mixer.layers.checks import check_int


def check_warmup(ilr_init: object, warmup_steps: object) -> None:
    """TypeError or ValueError naming ``ilr_init`` (a finite number >= 0) or ``warmup_steps`` (an int
    >= 0)."""
    check_non_negative_float("ilr_init", ilr_init)
    check_int("warmup_steps", warmup_steps, minimum=0)


def warmed_up_inner_lr(step: int, inner_lr: float, ilr_init: float, warmup_steps: int) -> float:
    """The inner learning rate of outer step ``step`` (counted from 0) that warms up from
    ``ilr_init`` to ``inner_lr``, reached at step ``warmup_steps - 1``."""
    check_int("step", step, minimum=0)
    check_non_negative_float("inner_lr", inner_lr)
    check_warmup(ilr_init, warmup_steps)
    if warmup_steps == 0:
        return inner_lr
    return ilr_init + (inner_lr - ilr_init) * min(1.0, (step + 1) / warmup_steps)


class InnerLrWarmup(TrainerCallback):
    """A ``Trainer`` callback that warms up a TTT-E2E model's inner learning rate: the model's
    ``config.inner_lr`` when training begins is the target; each optimiser step runs with
    ``warmed_up_inner_lr`` of its ``global_step``, and between steps (where the Trainer evaluates
    and saves checkpoints) and after training the config holds the target again, the rate the
    trained model runs at (the authors evaluate at the full rate too)."""

    def __init__(self, ilr_init: float, warmup_steps: int) -> None:
        check_warmup(ilr_init, warmup_steps)
        self.ilr_init = ilr_init
        self.warmup_steps = warmup_steps
        self.inner_lr: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.inner_lr = kwargs["model"].config.inner_lr

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        kwargs["model"].config.inner_lr = warmed_up_inner_lr(
            state.global_step, self.inner_lr, self.ilr_init, self.warmup_steps
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        kwargs["model"].config.inner_lr = self.inner_lr
