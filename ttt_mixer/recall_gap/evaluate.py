"""Evaluation of a saved checkpoint through lm-eval: the project's ``ttt_mqar`` task on lm-eval's
``hf`` model (``HFLM``, what ``lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True``
builds), at several MQAR shapes, and ``ttt_mqar_twice`` (the same sequences with their key-value
pairs given twice before the queries: the JRT prompt) at the same shapes; and the checkpoint's size
and recurrent state size.

The task takes one number of key-value pairs per run, so the shapes are evaluated in one
``simple_evaluate`` call per pair count, all on the same loaded model. Under ``accelerate launch``
every process takes part (lm-eval splits the documents between them) and only the main process gets
the results.
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
from ttt_mixer.recall_gap.presets import MQARShape

TASK = "ttt_mqar"
TWICE_TASK = "ttt_mqar_twice"  # the JRT prompt: the pairs read twice
METRIC = "acc"  # the bound value is the likeliest of the sequence's values; chance 1 / num_kv_pairs


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
    accuracy: dict[MQARShape, float]
    lm_eval_results: dict[str, Any]  # lm-eval's results, one task entry per task and pair count
    accuracy_twice: dict[MQARShape, float]  # with the JRT prompt (TWICE_TASK)


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


def evaluate_checkpoint(
    checkpoint: str | Path,
    shapes: Sequence[MQARShape],
    samples: int,
    batch_size: int,
    state_length: int,
) -> Evaluation | None:
    """``acc`` of ``ttt_mqar`` and of ``ttt_mqar_twice`` at every shape (``samples`` sequences each,
    the task's own seed) of the checkpoint loaded as lm-eval's ``hf`` model; its parameters and
    state size (an attention cache's at ``state_length`` tokens). None on processes other than the
    main one."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not shapes:
        raise ValueError("shapes must name at least one MQAR shape to evaluate")
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
    accuracy: dict[MQARShape, float] = {}
    accuracy_twice: dict[MQARShape, float] = {}
    merged: dict[str, Any] = {"results": {}, "n-samples": {}, "model_name": str(checkpoint)}
    by_pairs = itertools.groupby(
        sorted(shapes, key=lambda s: (s.num_kv_pairs, s.seq_len)), lambda s: s.num_kv_pairs
    )
    for pairs, group in by_pairs:
        lengths = [shape.seq_len for shape in group]
        # max_length and the checkpoint (its tokenizer) let the task refuse sequences lm-eval would cut (eval_tasks/recall.py)
        metadata = {
            "mqar_seq_lengths": lengths,
            "mqar_num_kv_pairs": pairs,
            "num_samples": samples,
            "max_length": lm.max_length,
            "pretrained": str(checkpoint),
        }
        tasks = TaskManager(include_path=tasks_path(), include_defaults=False, metadata=metadata)
        output = simple_evaluate(
            model=lm, tasks=[TASK, TWICE_TASK], task_manager=tasks, log_samples=False, verbosity="ERROR"
        )
        if output is None:  # not the main process
            continue
        for task, scores_of in ((TASK, accuracy), (TWICE_TASK, accuracy_twice)):
            scores = output["results"][task]
            name = f"{task}_kv{pairs}"
            merged["results"][name] = scores
            merged["n-samples"][name] = output.get("n-samples", {}).get(task)
            for length in lengths:
                scores_of[MQARShape(length, pairs)] = float(scores[f"{METRIC}@{length},none"])
    if not accuracy:
        return None
    return Evaluation(parameters, state, accuracy, merged, accuracy_twice)


def write_lm_eval_results(evaluation: Evaluation, path: Path) -> None:
    """lm-eval's results of every pair count, in one lm-eval-style JSON (``ttt-mixer plot`` reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evaluation.lm_eval_results, indent=2, default=str))
