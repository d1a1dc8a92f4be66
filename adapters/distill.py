"""Attention transfer (LoLCATs): train swapped mixers to reproduce the layers they replaced.

Stage 1 (layer-wise): each swapped layer of the student gets the teacher's own input to that layer
and learns to match the teacher layer's output (mean squared error, all layers at once, only the
swapped mixers train). Stage 2 (optional): the swapped mixers are fine-tuned end to end on the
next-token loss of the same text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ttt_mixer.adapters.swap import mixer_names, mixer_path
from ttt_mixer.progress import Progress


@dataclass
class DistillReport:
    """Per-step training losses of the two stages."""

    layerwise_losses: list[float] = field(default_factory=list)
    finetune_losses: list[float] = field(default_factory=list)


def swapped_layers(student: PreTrainedModel, teacher: PreTrainedModel) -> list[int]:
    """Indices of the layers whose mixer differs between student and teacher."""
    student_mixers, teacher_mixers = mixer_names(student), mixer_names(teacher)
    if len(student_mixers) != len(teacher_mixers) or mixer_path(student) != mixer_path(teacher):
        raise ValueError("student and teacher must be the same backbone with the same number of layers")
    return [i for i, (s, t) in enumerate(zip(student_mixers, teacher_mixers, strict=True)) if s != t]


def _output(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _batches(input_ids: torch.Tensor, batch_size: int, steps: int, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield input_ids[torch.randint(len(input_ids), (batch_size,), generator=generator)]


class NonFiniteTrainingError(RuntimeError):
    """Training produced a non-finite loss or weights; the student must not be used or saved."""


def _check_finite(stage: str, step: int, loss: float, parameters: list[nn.Parameter] | None = None) -> None:
    """Stops training whose loss (or, at the end of a stage, weights) stopped being finite: a step's
    loss shows the weights of the step before, ``parameters`` the last step's."""
    if not math.isfinite(loss) or (
        parameters is not None and not all(p.isfinite().all() for p in parameters)
    ):
        raise NonFiniteTrainingError(
            f"distill: the {stage} stage became non-finite at step {step} (loss {loss:.4g}); lower lr. "
            "The student's weights are unusable: nothing was saved"
        )


def _step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    losses: list[float],
    stage: str,
    bar: Progress,
    metric: str,
) -> None:
    """One optimiser step on ``loss``, which joins the stage's ``losses`` and the progress bar (as
    ``metric``); a non-finite loss stops training."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    _check_finite(stage, len(losses), losses[-1])
    bar.update(status=f"{metric}={losses[-1]:.3g}")


def _check(input_ids: Any, batch_size: int, lr: float, steps: dict[str, int]) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor [num_sequences, seq_len]")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    for name, value in steps.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def distill(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    layerwise_steps: int = 200,
    finetune_steps: int = 0,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> DistillReport:
    """Trains ``student``'s swapped mixers (in place) to reproduce ``teacher`` on ``input_ids``.

    student: the model ``swap_mixer`` made from ``teacher`` (same backbone; other weights equal).
    input_ids: [num_sequences, seq_len] token windows of the text to distil on.
    """
    _check(input_ids, batch_size, lr, {"layerwise_steps": layerwise_steps, "finetune_steps": finetune_steps})
    layers = swapped_layers(student, teacher)
    if not layers:
        raise ValueError("student and teacher hold the same mixers: nothing to distil")
    path = mixer_path(student)
    student_mixers = [student.get_submodule(path.format(i)) for i in layers]
    teacher_mixers = [teacher.get_submodule(path.format(i)) for i in layers]
    parameters = [p for mixer in student_mixers for p in mixer.parameters()]
    device = next(student.parameters()).device
    teacher.eval()
    student.train()
    report = DistillReport()

    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append((hidden.detach(), _output(output).detach()))

    hooks = [mixer.register_forward_hook(capture, with_kwargs=True) for mixer in teacher_mixers]
    try:
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
        bar = Progress(layerwise_steps, "distil layer-wise", enabled=progress)
        for batch in _batches(input_ids, batch_size, layerwise_steps, seed):
            captured.clear()
            with torch.no_grad():
                teacher(input_ids=batch.to(device), use_cache=False)
            loss = sum(
                F.mse_loss(_output(mixer(hidden)).float(), target.float())
                for mixer, (hidden, target) in zip(student_mixers, captured, strict=True)
            ) / len(layers)
            _step(optimizer, loss, report.layerwise_losses, "layer-wise", bar, "mse")
    finally:
        for hook in hooks:
            hook.remove()
    if report.layerwise_losses:
        _check_finite("layer-wise", layerwise_steps, report.layerwise_losses[-1], parameters)

    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    bar.close()
    bar = Progress(finetune_steps, "fine-tune end to end", enabled=progress and finetune_steps > 0)
    for batch in _batches(input_ids, batch_size, finetune_steps, seed + 1):
        batch = batch.to(device)
        loss = student(input_ids=batch, labels=batch, use_cache=False).loss
        _step(optimizer, loss, report.finetune_losses, "fine-tune", bar, "loss")
    bar.close()
    if report.finetune_losses:
        _check_finite("fine-tune", finetune_steps, report.finetune_losses[-1], parameters)
    student.eval()
    return report


@torch.no_grad()
def perplexity(model: PreTrainedModel, input_ids: torch.Tensor, batch_size: int = 16) -> float:
    """exp of the mean next-token loss over all windows of ``input_ids`` [num_sequences, seq_len]."""
    _check(input_ids, batch_size, 1.0, {})
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        batch = input_ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)
