"""The whole command: plan, train and evaluate (or evaluate given checkpoints), write the tables
and the plot, print the table, and fail when attention did not learn the task."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ttt_mixer.recall_gap import launch
from ttt_mixer.recall_gap.presets import BACKBONES, RECALL_GAP_MODELS, Preset
from ttt_mixer.recall_gap.report import (
    Row,
    best_rows,
    jrt_prompt_table,
    markdown_table,
    not_learned,
    plot,
    write_tables,
)
from ttt_mixer.recall_gap.runner import EvalSettings, distributed, evaluate_checkpoints, plan, run_all


class RecallGapFailure(SystemExit):
    """Exit status 1 with a message: the run finished, but its results are not meaningful."""

    def __init__(self, message: str) -> None:
        super().__init__(f"ttt-mixer recall-gap: FAILED: {message}")


def attention_failures(rows: Sequence[Row], threshold: float) -> list[str]:
    """Trained attention rows below ``threshold`` at their training shape, described."""
    return [
        f"{row.name} (width {row.width}, lr {row.learning_rate:g}, seed {row.seed}) reached {row.accuracy[row.train_shape]:.3f} "
        f"at its training shape {row.train_shape.label}"
        for row in not_learned(rows, threshold)
        if row.mixer == "attention"
    ]


def _default_jobs(runs: int) -> int:
    """One run per CPU core on a CPU machine; one at a time on GPUs or under a distributed launch."""
    if torch.cuda.is_available() or distributed():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, runs))


def _summary(preset: Preset, seeds: Sequence[int], checkpoints: Sequence[str] | None, seconds: float) -> str:
    shape = preset.train_shapes[0]  # its class names the task and its scoring
    if checkpoints:
        return f"{len(checkpoints)} checkpoints evaluated through lm-eval ({shape.lm_eval_task}, acc) in {seconds:.0f} s."
    shapes = ", ".join(s.label for s in preset.train_shapes)
    widths = ", ".join(str(w) for w in preset.widths)
    batch = preset.batch_size if isinstance(preset.batch_size, int) else "Zoology's per-length number of"
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"each of seeds {', '.join(map(str, seeds))}"
    # a model row is not a mixer in the backbone: the summary says what it is instead
    models = "".join(
        f" {name} is a model of its own at these sizes, not a mixer in the backbone: "
        f"{RECALL_GAP_MODELS[name].description}."
        for name in preset.mixers
        if name in RECALL_GAP_MODELS
    )
    return (
        f"Preset `{preset.name}`: {BACKBONES[preset.backbone]} of {preset.num_layers} layers (width {widths}, "
        f"{preset.num_heads} head(s)), the mixer swapped into every layer; {preset.steps} steps of "
        f"{batch} sequences of {shape.title} {shapes} per mixer and {seed_text}; evaluated through lm-eval "
        f"({shape.lm_eval_task}, {shape.scoring}) on {preset.eval_samples} sequences per shape.{models} Whole run: {seconds:.0f} s. "
        "Recurrent state: numbers per sequence, all layers; attention's KV cache grows with the length."
    )


def recall_gap(
    preset: Preset,
    out: Path,
    seeds: Sequence[int] = (0,),
    jobs: int | None = None,
    save_steps: int | None = None,
    eval_batch_size: int = 64,
    checkpoints: Sequence[str] | None = None,
) -> list[Row]:
    """Run ``preset`` into ``out`` once per seed of ``seeds`` (or evaluate ``checkpoints``), write
    ``recall_gap.md``, ``recall_gap.json`` and ``recall_gap.png`` there and print the table. Returns the table's rows
    (empty on processes other than the main one). Raises :class:`RecallGapFailure` when trained
    attention stays below ``preset.min_attention_accuracy``, after writing the files."""
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct integers >= 0, at least one; got {list(seeds)}")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    settings = EvalSettings(samples=preset.eval_samples, batch_size=eval_batch_size)
    if checkpoints:
        shapes = preset.eval_shapes(preset.train_shapes[0])
        all_rows = evaluate_checkpoints(checkpoints, shapes, settings, out)
    else:
        specs = plan(preset, seeds)
        save_steps = save_steps or max(1, preset.steps // 5)
        all_rows = run_all(specs, out, preset, settings, save_steps, jobs or _default_jobs(len(specs)))
    if not launch.is_main_process():
        return []
    rows = best_rows(all_rows)
    failures = [] if checkpoints else attention_failures(rows, preset.min_attention_accuracy)
    info = {
        "preset": preset.name,
        "task": preset.task,
        "summary": _summary(preset, seeds, checkpoints, time.perf_counter() - start),
        "seeds": None if checkpoints else list(seeds),
        "seconds": time.perf_counter() - start,
        "status": "failed" if failures else "ok",
        "failures": failures,
        "learned_accuracy": preset.learned_accuracy,
        "not_learned": list(dict.fromkeys(row.name for row in not_learned(rows, preset.learned_accuracy))),
    }
    written = [*write_tables(rows, all_rows, out, info, preset.learned_accuracy), plot(rows, out)]
    if failures:
        raise RecallGapFailure(
            f"attention must reach {preset.min_attention_accuracy} {preset.train_shapes[0].title} accuracy at its training shape, "
            f"so training is broken and the table is not meaningful: {'; '.join(failures)}. "
            f"Files (for debugging): {', '.join(str(p) for p in written)}"
        )
    print(markdown_table(rows, preset.learned_accuracy))
    print(jrt_prompt_table(rows))
    print(info["summary"])
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return rows
