"""One training run: a Llama or Mamba backbone with one mixer in every layer, trained on MQAR (or set
disjointness, by its training shape) through
transformers' ``Trainer`` (so ``accelerate launch`` spreads it over several GPUs), checkpointed as it
goes and resumed from its last checkpoint when run again, then saved as a Hugging Face checkpoint
with its tokenizer."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedModel,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint

from ttt_mixer.adapters import swap_mixer
from ttt_mixer.e2e import E2EConfig, E2EForCausalLM
from ttt_mixer.recall_gap import launch
from ttt_mixer.recall_gap.data import MQARDataset, SetDisjointnessDataset, word_tokenizer
from ttt_mixer.recall_gap.presets import TrainShape, check_backbone
from ttt_mixer.recall_gap.set_disjointness import (
    SET_DISJOINTNESS_VOCAB,
    SetDisjointnessShape,
)
from ttt_mixer.recall_gap.vocabulary import EOS_ID, PAD_ID, VOCAB
from ttt_mixer.training import FiniteLossTrainer

MODEL_DIR, TRAINER_DIR, TRAIN_RESULT = "model", "trainer", "train.json"


class WithoutMessage(logging.Filter):
    """Drops one message of a dependency's logger: its remark on our use that the user cannot act on."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# Checkpoints of a short run are saved within a second of each other, so Trainer's checkpoint
# rotation finds their mtimes alike and says it orders them by step instead, which is right anyway.
logging.getLogger("transformers.trainer_utils").addFilter(WithoutMessage("mtime may not be reliable"))


@dataclass(frozen=True)
class RunSpec:
    """One model to train: the backbone's sizes, the mixer, the data and the optimisation."""

    mixer: str
    width: int
    num_layers: int
    num_heads: int
    train_shape: TrainShape  # its type is the task trained on
    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    max_length: int  # the longest sequence it is evaluated on (the Llama config's max_position_embeddings)
    # swap_mixer's options; for a model row (presets.RECALL_GAP_MODELS), its config's fields
    mixer_options: Mapping[str, Any] = field(default_factory=dict)
    backbone: str = "llama"  # one of presets.BACKBONES (a model row has its own)

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        if self.mixer in MODEL_ROWS:
            MODEL_ROWS[self.mixer].check(self)

    @property
    def task(self) -> str:
        return self.train_shape.task

    @property
    def vocabulary(self) -> Mapping[str, int]:
        """The task's words and their token ids (its tokenizer's and its model's vocabulary)."""
        return SET_DISJOINTNESS_VOCAB if isinstance(self.train_shape, SetDisjointnessShape) else VOCAB

    @property
    def name(self) -> str:
        return f"{self.mixer}-d{self.width}-{self.train_shape.label}-lr{self.learning_rate:g}-seed{self.seed}"

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "task": self.task,
            "train_shape": asdict(self.train_shape),
            "mixer_options": dict(self.mixer_options),
        }


def check_e2e(spec: RunSpec) -> None:
    """The ``ttt_e2e`` row's window must be below the training length, so that recall needs its inner
    loop."""
    window = spec.mixer_options.get("sliding_window_size")
    if window is None or window >= spec.train_shape.seq_len:
        raise ValueError(
            f"ttt_e2e: its sliding_window_size must be below the training length "
            f"{spec.train_shape.seq_len}, so that recall needs its inner loop; got {window}"
        )


def build_e2e(spec: RunSpec) -> E2EForCausalLM:
    """The seeded TTT-E2E model of the ``ttt_e2e`` row: the spec's width, layers and heads, its task's
    vocabulary, SwiGLU MLPs of width 4x and an untied head as the Llama backbone has, weights
    N(0, 0.02); window, mini-batch and suffix from ``spec.mixer_options`` (``presets.E2E_RECALL``).
    No BOS: E2E's inner loss skips targets equal to ``bos_token_id``."""
    torch.manual_seed(spec.seed)
    config = E2EConfig(
        vocab_size=len(spec.vocabulary),
        hidden_size=spec.width,
        intermediate_size=4 * spec.width,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        initializer_range=0.02,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
        tie_word_embeddings=False,
        **spec.mixer_options,
    )
    return E2EForCausalLM(config)


@dataclass(frozen=True)
class ModelRow:
    """How a model row (``presets.RECALL_GAP_MODELS``) is built, and what its run spec must satisfy."""

    build: Callable[[RunSpec], PreTrainedModel]
    check: Callable[[RunSpec], None]  # ValueError for a spec the row cannot mean anything with


# one per model row (tests/recall_gap/test_e2e_row.py checks it covers RECALL_GAP_MODELS)
MODEL_ROWS = {"ttt_e2e": ModelRow(build=build_e2e, check=check_e2e)}


def build_model(spec: RunSpec) -> PreTrainedModel:
    """The seeded backbone with ``spec.mixer`` in every layer (see ``presets.BACKBONES``): token
    embedding, RMSNorms and an untied head, with SwiGLU MLPs of width 4x ("llama") or without MLPs
    ("mamba"); weights N(0, 0.02), the range of Llama and fla (transformers' Mamba mixers keep
    transformers' own init, and Longhorn its ``initializer_range`` when its options give one,
    ``swap_mixer``). A model row (``presets.RECALL_GAP_MODELS``) is built by its own builder."""
    if spec.mixer in MODEL_ROWS:
        return MODEL_ROWS[spec.mixer].build(spec)
    shared = {
        "vocab_size": len(spec.vocabulary),
        "hidden_size": spec.width,
        "num_hidden_layers": spec.num_layers,
        "initializer_range": 0.02,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(spec.seed)
    if spec.backbone == "mamba":
        # num_heads: the heads of the mixers that have them (swap_mixer's Mamba backbone reads it)
        base = MambaForCausalLM(MambaConfig(**shared, num_heads=spec.num_heads))
    else:
        config = LlamaConfig(
            **shared,
            intermediate_size=4 * spec.width,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=spec.max_length,
        )
        base = LlamaForCausalLM(config)
    return swap_mixer(base, spec.mixer, layers="all", **spec.mixer_options)


class TrainingClock(TrainerCallback, ExportableState):
    """Seconds spent training, kept in every checkpoint (the Trainer restores it on resume), so a
    resumed run reports the time of the steps that made its model, not of the lost ones."""

    def __init__(self, elapsed: float = 0.0) -> None:
        self.elapsed = elapsed  # before this session
        self.started: float | None = None

    def seconds(self) -> float:
        return self.elapsed + (0.0 if self.started is None else time.perf_counter() - self.started)

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # the first step of this session: the Trainer restores this callback from a checkpoint after
        # on_train_begin, so the clock starts here
        if self.started is None:
            self.started = time.perf_counter()

    def state(self) -> dict[str, Any]:
        return {"args": {"elapsed": self.seconds()}, "attributes": {}}


class ProgressFile(TrainerCallback):
    """Writes ``{"step": n, "total": N}`` to a file at most twice a second, for a parent process
    that draws the progress bars of several runs at once."""

    def __init__(self, path: Path) -> None:
        self.path, self.written = path, 0.0

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if now - self.written >= 0.5 or state.global_step == state.max_steps:
            self.path.write_text(json.dumps({"step": state.global_step, "total": state.max_steps}))
            self.written = now


class RecallTrainer(FiniteLossTrainer):
    """transformers' ``Trainer``, stopping at a non-finite loss (``FiniteLossTrainer``) and leaving
    out of weight decay the parameters their layers mark ``_no_weight_decay`` (Mamba's A_log and D,
    Gated DeltaNet's A_log and dt_bias), as their own libraries' training recipes do."""

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        exempt = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
        return [name for name in super().get_decay_parameter_names(model) if name not in exempt]


@dataclass(frozen=True)
class TrainResult:
    train_seconds: float
    final_loss: float | None
    resumed_from_step: int | None


def _training_arguments(
    spec: RunSpec, output_dir: Path, save_steps: int, progress_bars: bool
) -> TrainingArguments:
    world_size = launch.world_size()  # read before TrainingArguments sets up the process group
    if spec.batch_size % world_size:
        raise ValueError(f"batch_size {spec.batch_size} must be a multiple of the {world_size} processes")
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size // world_size,
        learning_rate=spec.learning_rate,
        # AdamW's beta2 of the Mamba, fla and Llama training recipes: with the default 0.999 the
        # second moments remember the large gradients of the first steps for hundreds more, which kept
        # Gated DeltaNet on the unigram plateau (the runs: docs/recall_gap.md, "AdamW's beta2 0.95")
        adam_beta2=0.95,
        weight_decay=0.1,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, spec.steps // 10),
        max_grad_norm=1.0,
        logging_steps=max(1, spec.steps // 10),
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        restore_callback_states_from_checkpoint=True,
        report_to="none",
        seed=spec.seed,
        dataloader_drop_last=True,
        disable_tqdm=not progress_bars,
        use_cpu=not torch.cuda.is_available(),
    )


def train_run(
    spec: RunSpec,
    run_dir: Path,
    save_steps: int,
    progress_bars: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train ``spec`` under ``run_dir`` (Trainer checkpoints in ``trainer/``, resumed from the last
    one), save the model and tokenizer to ``model/`` and the result to ``train.json``. Extra
    ``callbacks`` (e.g. a :class:`ProgressFile`) go to the Trainer. A run whose callbacks stop it
    early saves no model and returns its partial result."""
    if save_steps < 1:
        raise ValueError(f"save_steps must be >= 1, got {save_steps}")
    output_dir = run_dir / TRAINER_DIR
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    model = build_model(spec)
    size, shape = spec.steps * spec.batch_size, spec.train_shape
    if isinstance(shape, SetDisjointnessShape):
        data: torch.utils.data.Dataset = SetDisjointnessDataset(size, shape, spec.seed)
    else:
        data = MQARDataset(size, shape.seq_len, shape.num_kv_pairs, spec.seed)
    clock = TrainingClock()
    trainer = RecallTrainer(
        model=model,
        args=_training_arguments(spec, output_dir, save_steps, progress_bars),
        train_dataset=data,
        callbacks=[clock, *callbacks],
    )
    trainer.train(resume_from_checkpoint=last)
    clock = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainingClock))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = TrainResult(
        train_seconds=clock.seconds(),
        final_loss=losses[-1] if losses else None,
        resumed_from_step=int(Path(last).name.split("-")[-1]) if last else None,
    )
    if trainer.state.global_step < spec.steps:
        return result
    trainer.save_model(str(run_dir / MODEL_DIR))
    if trainer.is_world_process_zero():
        word_tokenizer(spec.vocabulary).save_pretrained(run_dir / MODEL_DIR)
        (run_dir / TRAIN_RESULT).write_text(json.dumps(asdict(result), indent=2))
    PartialState().wait_for_everyone()  # the main process evaluates the saved model next
    return result


def load_train_result(run_dir: Path) -> TrainResult | None:
    """The result of a finished run, None when it has not finished."""
    path = run_dir / TRAIN_RESULT
    if not path.is_file() or not (run_dir / MODEL_DIR).is_dir():
        return None
    return TrainResult(**json.loads(path.read_text()))
