"""The training loop shared by distillation (``ttt_mixer.adapters.distill``) and the recall gap
(``ttt_mixer.recall_gap.train``): transformers' ``Trainer``, stopped at a non-finite loss
(``FiniteLossTrainer``), and the error both report it with (``NonFiniteTrainingError``)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer


class NonFiniteTrainingError(RuntimeError):
    """Training produced a non-finite loss or weights; the model must not be used or saved."""


class FiniteLossTrainer(Trainer):
    """transformers' ``Trainer``, stopping at a non-finite loss, before the optimiser steps and
    before anything more is saved."""

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not torch.isfinite(loss):
            raise NonFiniteTrainingError(
                f"training became non-finite at step {self.state.global_step + 1} (loss {loss.item():.4g}); "
                "lower the learning rate. Nothing of this step was saved"
            )
        return loss
