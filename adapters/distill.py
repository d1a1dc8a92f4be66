"""Attention transfer (LoLCATs): train swapped mixers to reproduce the layers they replaced.

Stage 1 (layer-wise): each swapped layer of the student gets the teacher's own input to that layer
and learns to match the teacher layer's output (mean squared error, all layers at once, only the
swapped mixers train). Stage 2 (optional): the swapped mixers are fine-tuned end to end on the
next-token loss of the same text.

Both stages train through transformers' ``Trainer``, so ``torchrun`` / ``accelerate launch`` spread
them over several processes (the batch is the global one, split between them). In stage 1 the
teacher is part of the data: a collator runs its base model (no LM head, stopped after the last
swapped layer) and hands each batch over as the swapped layers' inputs and outputs; on CPU it runs
in a DataLoader worker, so the teacher's forward of the next batch overlaps the student's step. The
student trains only its swapped mixers, on those inputs, never its whole model.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ttt_mixer.adapters.swap import mixer_names, mixer_path
from ttt_mixer.training import FiniteLossTrainer, NonFiniteTrainingError


@dataclass
class DistillReport:
    """Per-step training losses of the two stages (the mean over all processes)."""

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


def _check_finite_weights(stage: str, parameters: list[nn.Parameter]) -> None:
    if not all(p.isfinite().all() for p in parameters):
        raise NonFiniteTrainingError(
            f"distill: the {stage} stage left non-finite weights; lower lr. "
            "The student's weights are unusable: nothing was saved"
        )


class LossBar(ProgressCallback):
    """Trainer's progress bar with the last step's loss beside it, instead of a printed line per log."""

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: Any = None, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3g}")


class Windows(torch.utils.data.Dataset):
    """The rows of ``input_ids`` [num_sequences, seq_len] as training examples (labels = inputs)."""

    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


class _StopForward(Exception):
    """Ends the teacher's forward after the last layer whose output is needed."""


class TeacherTargets:
    """Collator of stage 1: stacks a batch of windows and runs the teacher's base model on it, giving
    each swapped layer's mixer input (``hidden``) and output (``target``), [layers, B, T, D]."""

    def __init__(self, teacher: PreTrainedModel, layers: list[int], bf16: bool) -> None:
        self.teacher, self.layers, self.bf16 = teacher, layers, bf16
        path = mixer_path(teacher)
        self.mixers = [teacher.get_submodule(path.format(i)) for i in layers]

    @torch.no_grad()
    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        device = next(self.teacher.parameters()).device
        input_ids = torch.stack([row["input_ids"] for row in rows]).to(device)
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            captured.append((args[0] if args else kwargs["hidden_states"], _output(output)))
            if len(captured) == len(self.mixers):
                raise _StopForward

        hooks = [mixer.register_forward_hook(capture, with_kwargs=True) for mixer in self.mixers]
        try:
            with torch.autocast(device.type, torch.bfloat16, enabled=self.bf16):
                self.teacher.base_model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        return {
            "hidden": torch.stack([hidden for hidden, _ in captured]),
            "target": torch.stack([output for _, output in captured]),
        }


class SwappedMixers(nn.Module):
    """The student of stage 1: its swapped mixers (the same modules, trained in place), each on the
    teacher's input to its layer; the loss is the mean over layers of the mean squared error to the
    teacher layer's output."""

    def __init__(self, mixers: list[nn.Module], gradient_checkpointing: bool) -> None:
        super().__init__()
        self.mixers = nn.ModuleList(mixers)
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = []
        for mixer, layer_input, layer_target in zip(self.mixers, hidden, target, strict=True):
            if self.gradient_checkpointing:
                output = checkpoint(mixer, layer_input, use_reentrant=False)
            else:
                output = mixer(layer_input)
            losses.append(F.mse_loss(_output(output).float(), layer_target.float()))
        return {"loss": torch.stack(losses).mean()}


@dataclass(frozen=True)
class TrainOptions:
    """What both stages share: the optimisation (AdamW at a constant ``lr``, no weight decay, no
    clipping, as LoLCATs' attention transfer) and how it runs."""

    lr: float
    batch_size: int  # global: split between the processes
    seed: int
    progress: bool
    gradient_checkpointing: bool
    bf16: bool


def _train(
    model: nn.Module,
    data: torch.utils.data.Dataset,
    collator: Any,
    steps: int,
    options: TrainOptions,
    workers: int,
    output_dir: str,
    **arguments: Any,
) -> list[float]:
    """``steps`` optimiser steps of ``model``'s trainable parameters; the loss of every step."""
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=options.seed,
        dataloader_drop_last=True,
        dataloader_num_workers=workers,
        remove_unused_columns=False,
        disable_tqdm=not options.progress,
        bf16=options.bf16,
        use_cpu=not torch.cuda.is_available(),
        **arguments,
    )
    if options.batch_size % args.world_size:  # world_size: known once TrainingArguments set up
        raise ValueError(
            f"batch_size {options.batch_size} must be a multiple of the {args.world_size} processes"
        )
    args.per_device_train_batch_size = options.batch_size // args.world_size
    trainer = FiniteLossTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback):
        trainer.add_callback(LossBar)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _checkpointing_argument(enabled: bool) -> dict[str, bool]:
    # transformers 5.24 renamed TrainingArguments' gradient_checkpointing (the old name warns there)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing": enabled
    }


def _check(input_ids: Any, batch_size: int, lr: float, steps: dict[str, int], vocab_size: int | None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor [num_sequences, seq_len]")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids holds no tokens (shape {list(input_ids.shape)})")
    if vocab_size is not None and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(
            f"input_ids must be token ids in [0, {vocab_size}) (the teacher's vocabulary), "
            f"got values from {input_ids.min().item()} to {input_ids.max().item()}"
        )
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    for name, value in steps.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def check_precision(gradient_checkpointing: Any, bf16: Any) -> None:
    for name, value in (("gradient_checkpointing", gradient_checkpointing), ("bf16", bf16)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise ValueError(
            "bf16=True needs a CUDA GPU that supports bfloat16 (torch.cuda.is_bf16_supported()); "
            "on this machine distil in float32"
        )


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
    gradient_checkpointing: bool = False,
    bf16: bool = False,
) -> DistillReport:
    """Trains ``student``'s swapped mixers (in place) to reproduce ``teacher`` on ``input_ids``.

    student: the model ``swap_mixer`` made from ``teacher`` (same backbone; other weights equal).
    input_ids: [num_sequences, seq_len] token windows of the text to distil on, at least
        ``batch_size`` of them; each step draws ``batch_size`` windows (all of them once per epoch).
    batch_size: the global batch: under ``torchrun`` / ``accelerate launch`` each of N processes
        takes batch_size / N of it.
    gradient_checkpointing: recompute the activations in the backward pass instead of keeping them
        (less memory, about a third more compute): each swapped mixer in stage 1, each layer in stage 2.
    bf16: mixed precision (bfloat16 autocast, the teacher's targets included), for GPUs that support it.
    """
    check_precision(gradient_checkpointing, bf16)
    steps = {"layerwise_steps": layerwise_steps, "finetune_steps": finetune_steps}
    _check(input_ids, batch_size, lr, steps, teacher.get_input_embeddings().num_embeddings)
    if len(input_ids) < batch_size:
        raise ValueError(
            f"input_ids holds {len(input_ids)} sequences: fewer than batch_size {batch_size}, "
            "so no step has a whole batch"
        )
    layers = swapped_layers(student, teacher)
    if not layers:
        raise ValueError("student and teacher hold the same mixers: nothing to distil")
    path = mixer_path(student)
    mixers = [student.get_submodule(path.format(i)) for i in layers]
    parameters = [p for mixer in mixers for p in mixer.parameters()]
    # the teacher runs in a DataLoader worker on CPU (overlapping the student's step); a GPU's
    # teacher runs in the main process, where CUDA is
    workers = 1 if next(teacher.parameters()).device.type == "cpu" else 0
    options = TrainOptions(lr, batch_size, seed, progress, gradient_checkpointing, bf16)
    data = Windows(input_ids)
    report = DistillReport()
    teacher.eval()
    trainable = {p: p.requires_grad for p in student.parameters()}
    try:
        for p in student.parameters():
            p.requires_grad_(False)
        for p in parameters:
            p.requires_grad_(True)
        with tempfile.TemporaryDirectory(prefix="ttt-mixer-distill-") as output_dir:
            if layerwise_steps:
                stage = SwappedMixers(mixers, gradient_checkpointing).train()
                collator = TeacherTargets(teacher, layers, bf16)
                # the teacher's worker keeps one core busy: the student's step takes the others
                # (more threads than cores spin against each other)
                threads = torch.get_num_threads()
                torch.set_num_threads(max(1, threads - workers))
                try:
                    report.layerwise_losses = _train(
                        stage, data, collator, layerwise_steps, options, workers, output_dir
                    )
                finally:
                    torch.set_num_threads(threads)
                _check_finite_weights("layer-wise", parameters)
            if finetune_steps:
                student.train()
                # the second stage's data is drawn with its own seed, as before the Trainer
                finetune = dataclasses.replace(options, seed=seed + 1)
                report.finetune_losses = _train(
                    student,
                    data,
                    None,
                    finetune_steps,
                    finetune,
                    0,
                    output_dir,
                    **_checkpointing_argument(gradient_checkpointing),
                )
                _check_finite_weights("fine-tune", parameters)
    finally:
        for p, requires_grad in trainable.items():
            p.requires_grad_(requires_grad)
        student.eval()
    return report


@torch.no_grad()
def perplexity(model: PreTrainedModel, input_ids: torch.Tensor, batch_size: int = 16) -> float:
    """exp of the mean next-token loss over all windows of ``input_ids`` [num_sequences, seq_len]."""
    _check(input_ids, batch_size, 1.0, {}, model.get_input_embeddings().num_embeddings)
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
