"""Evaluation of a saved checkpoint through lm-eval: the project's ``ttt_mqar`` task on lm-eval's
``hf`` model (``HFLM``, what ``lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True``
builds), at several MQAR shapes, and ``ttt_mqar_twice`` (the same sequences with their key-value
pairs given twice before the queries: the JRT prompt) at the same shapes; or, for set-disjointness
shapes, ``ttt_set_disjointness`` and ``ttt_set_disjointness_twice`` (the two sets given twice); and
the checkpoint's size and recurrent state size.

The MQAR task takes one number of key-value pairs per run and set disjointness one set order, so the
shapes are evaluated in one ``simple_evaluate`` call per pair count (or order), all on the same
loaded model. Under ``accelerate launch`` every process takes part (lm-eval splits the documents
between them) and only the main process gets the results.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttt_mixer.adapters import MixerLlamaConfig, MixerMamba2Config, MixerMambaConfig, recurrent_state_size
from ttt_mixer.adapters.swap import mixer_path
from ttt_mixer.e2e import E2EConfig
from ttt_mixer.eval_tasks import tasks_path
from ttt_mixer.recall_gap.presets import TrainShape
from ttt_mixer.recall_gap.set_disjointness import SetDisjointnessShape

TASK = "ttt_mqar"
TWICE_TASK = "ttt_mqar_twice"  # the JRT prompt: the pairs read twice
METRIC = "acc"  # the bound value is the likeliest of the sequence's values; chance 1 / num_kv_pairs
SET_DISJOINTNESS_TASK = "ttt_set_disjointness"  # scored by the same metric; chance 1 / (L - 1)
SET_DISJOINTNESS_TWICE_TASK = "ttt_set_disjointness_twice"  # the JRT prompt: the two sets read twice


@dataclass(frozen=True)
class StateSize:
    """Numbers in one sequence's per-layer states, summed over layers. ``grows``: an attention
    cache, whose size is given at ``at_length`` tokens and grows with the length."""

    numbers: int | None  # None: unknown for this architecture
    grows: bool = False
    at_length: int | None = None


@dataclass(frozen=True)
class Evaluation:
    parameters: int
    state: StateSize
    accuracy: dict[TrainShape, float]
    lm_eval_results: dict[str, Any]  # lm-eval's results, one task entry per task and pair count (or order)
    accuracy_twice: dict[TrainShape, float]  # with the JRT prompt (TWICE_TASK)


def _kv_cache_size(config: Any, length: int) -> int | None:
    """Keys and values of every attention layer over ``length`` tokens."""
    # a Mamba backbone's config names the heads of its attention mixers num_heads
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    if heads is None or not hasattr(config, "hidden_size"):
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * kv_heads * head_dim * length


def e2e_state_size(config: E2EConfig) -> int:
    """Numbers in a TTT-E2E model's cache of one sequence once it has read a window and a mini-batch
    (``E2EModel``): every block's window, the keys and values of the last W - 1 tokens; every suffix
    block's inner weights (gate and up [I, D], down [D, I]); and, with a suffix, the tokens of the
    current mini-batch, whose inner step waits for the token after it: at most b suffix inputs [D]
    and their ids. Fixed in the length: the window slides and the inner weights are updated in place."""
    width = config.hidden_size
    windows = config.num_hidden_layers * 2 * (config.sliding_window_size - 1) * width
    inner = config.suffix_len * 3 * config.intermediate_size * width
    pending = config.mini_batch_size * (width + 1) if config.suffix_len else 0
    return windows + inner + pending


def state_size(model: nn.Module, length: int) -> StateSize:
    """The summed per-layer state of a ttt-mixer backbone (``swap_mixer``'s Llama, Mamba or Mamba-2), or of a plain Llama (its
    KV cache at ``length`` tokens), or of a TTT-E2E model (:func:`e2e_state_size`); unknown (None) for
    other architectures."""
    config = model.config
    if getattr(config, "model_type", None) == E2EConfig.model_type:
        return StateSize(e2e_state_size(config))
    if isinstance(config, (MixerLlamaConfig, MixerMambaConfig, MixerMamba2Config)):
        sizes = [
            recurrent_state_size(model.get_submodule(mixer_path(model).format(i)))
            for i in range(config.num_hidden_layers)
        ]
        attention = sum(size is None for size in sizes)
        kv = _kv_cache_size(config, length) if attention else 0
        total = sum(size or 0 for size in sizes) + attention * (kv or 0)
        return StateSize(total, grows=attention > 0, at_length=length if attention else None)
    if getattr(config, "model_type", None) == "llama":
        per_layer = _kv_cache_size(config, length)
        numbers = None if per_layer is None else per_layer * config.num_hidden_layers
        return StateSize(numbers, grows=True, at_length=length)
    return StateSize(None)


@dataclass(frozen=True)
class _Request:
    """One ``simple_evaluate`` call: a task read once and with the JRT prompt, on shapes that differ
    in length alone."""

    tasks: tuple[str, str]  # read once, read twice
    suffix: str  # of the task names in the merged results
    metadata: dict[str, Any]  # the task's options
    shapes: list[TrainShape]


def _requests(shapes: Sequence[TrainShape]) -> list[_Request]:
    """The calls that evaluate ``shapes``: MQAR's per pair count, set disjointness's per set order."""
    if not shapes:
        raise ValueError("shapes must name at least one MQAR or set-disjointness shape to evaluate")
    if len({shape.task for shape in shapes}) > 1:
        raise ValueError("shapes must be of one task, MQAR or set disjointness")
    requests = []
    for series, group in itertools.groupby(
        sorted(shapes, key=lambda s: (s.series, s.seq_len)), lambda s: s.series
    ):
        shapes_of = list(group)
        lengths = [shape.seq_len for shape in shapes_of]
        if isinstance(shapes_of[0], SetDisjointnessShape):
            tasks = (SET_DISJOINTNESS_TASK, SET_DISJOINTNESS_TWICE_TASK)
            metadata = {"sd_lengths": lengths, "sd_first_fraction": series}
            requests.append(_Request(tasks, f"_first{series:g}", metadata, shapes_of))
        else:
            metadata = {"mqar_seq_lengths": lengths, "mqar_num_kv_pairs": series}
            requests.append(_Request((TASK, TWICE_TASK), f"_kv{series}", metadata, shapes_of))
    return requests


def evaluate_checkpoint(
    checkpoint: str | Path,
    shapes: Sequence[TrainShape],
    samples: int,
    batch_size: int,
    state_length: int,
) -> Evaluation | None:
    """``acc`` of ``ttt_mqar`` and of ``ttt_mqar_twice`` at every MQAR shape (``samples`` sequences
    each), or of ``ttt_set_disjointness`` and its ``_twice`` at every set-disjointness shape
    (``samples`` documents each), the tasks' own seed, of the checkpoint loaded as lm-eval's ``hf``
    model; its parameters and state size (an attention cache's at ``state_length`` tokens). None on
    processes other than the main one."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    requests = _requests(shapes)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = HFLM(
        pretrained=str(checkpoint),
        trust_remote_code=True,
        device=device,
        batch_size=batch_size,
        dtype="float32",
    )
    parameters = sum(p.numel() for p in lm.model.parameters())
    state = state_size(lm.model, state_length)
    accuracy: dict[TrainShape, float] = {}
    accuracy_twice: dict[TrainShape, float] = {}
    merged: dict[str, Any] = {"results": {}, "n-samples": {}, "model_name": str(checkpoint)}
    for request in requests:
        # max_length and the checkpoint (its tokenizer) let the task refuse sequences lm-eval would cut (eval_tasks/documents.py)
        metadata = {
            **request.metadata,
            "num_samples": samples,
            "max_length": lm.max_length,
            "pretrained": str(checkpoint),
        }
        tasks = TaskManager(include_path=tasks_path(), include_defaults=False, metadata=metadata)
        output = simple_evaluate(
            model=lm, tasks=list(request.tasks), task_manager=tasks, log_samples=False, verbosity="ERROR"
        )
        if output is None:  # not the main process
            continue
        for task, scores_of in zip(request.tasks, (accuracy, accuracy_twice), strict=True):
            scores = output["results"][task]
            name = f"{task}{request.suffix}"
            merged["results"][name] = scores
            merged["n-samples"][name] = output.get("n-samples", {}).get(task)
            for shape in request.shapes:
                scores_of[shape] = float(scores[f"{METRIC}@{shape.seq_len},none"])
    if not accuracy:
        return None
    return Evaluation(parameters, state, accuracy, merged, accuracy_twice)


def write_lm_eval_results(evaluation: Evaluation, path: Path) -> None:
    """lm-eval's results of every pair count, in one lm-eval-style JSON (``ttt-mixer plot`` reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evaluation.lm_eval_results, indent=2, default=str))
