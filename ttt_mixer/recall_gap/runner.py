"""Runs the plan: every (mixer, width, training shape, learning rate) trained, saved and evaluated
under ``OUT/runs/NAME/``, one after the other or in parallel worker processes (``jobs``), each
skipped where an earlier invocation finished it and resumed from its last checkpoint where one was
interrupted; or, in checkpoints mode, the given checkpoints evaluated.

Run folder: ``run.json`` (the spec; a different spec in the same folder is an error), ``trainer/``
(Trainer checkpoints), ``model/`` (the final Hugging Face checkpoint and tokenizer), ``train.json``,
``evaluation.json`` (accuracy, read once and with the JRT prompt, parameters, state size) and
``lm_eval_results.json`` (lm-eval's results); with ``jobs`` > 1 also ``log.txt`` (the worker's output) and ``progress.json``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ttt_mixer.progress import Progress, on_terminal
from ttt_mixer.recall_gap import launch
from ttt_mixer.recall_gap.evaluate import StateSize, evaluate_checkpoint, write_lm_eval_results
from ttt_mixer.recall_gap.presets import RECALL_GAP_ROWS, Preset, TrainShape
from ttt_mixer.recall_gap.report import Row
from ttt_mixer.recall_gap.train import MODEL_DIR, ProgressFile, RunSpec, load_train_result, train_run
from ttt_mixer.training import NonFiniteTrainingError

RUNS_DIR, SPEC_FILE, EVAL_FILE, LM_EVAL_FILE = "runs", "run.json", "evaluation.json", "lm_eval_results.json"
LOG_FILE, PROGRESS_FILE = "log.txt", "progress.json"


@dataclass(frozen=True)
class EvalSettings:
    samples: int
    batch_size: int


def plan(preset: Preset, seeds: Sequence[int]) -> list[RunSpec]:
    """Every run of the preset for every seed, seed by seed, each seed's in table order: mixer, then
    width, shape and learning rate."""
    specs = []
    for seed in seeds:
        for mixer in preset.mixers:
            for width in preset.widths:
                for shape in preset.train_shapes:
                    for lr in preset.learning_rates_for(mixer):
                        specs.append(
                            RunSpec(
                                mixer=mixer,
                                width=width,
                                num_layers=preset.num_layers,
                                num_heads=preset.num_heads,
                                train_shape=shape,
                                steps=preset.steps,
                                batch_size=preset.batch_size_for(shape.seq_len),
                                learning_rate=lr,
                                seed=seed,
                                # the longest evaluated sequence, with the JRT prompt's repeat
                                max_length=max(s.longest_tokens for s in preset.eval_shapes(shape)),
                                mixer_options=dict(preset.mixer_options.get(mixer, {})),
                                backbone=preset.backbone,
                            )
                        )
    return specs


def _claim(run_dir: Path, spec: RunSpec) -> None:
    """Record the spec in its folder; a folder holding another spec is an error, not overwritten."""
    path = run_dir / SPEC_FILE
    wanted = spec.to_json()
    if path.is_file():
        # a spec written before the task was recorded is MQAR's, the one task then
        found = {"task": "mqar", **json.loads(path.read_text())}
        if found != wanted:
            changed = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise ValueError(
                f"{run_dir} holds a run with other settings ({', '.join(changed)} differ); "
                "choose another --out folder, or delete it to start over"
            )
        return
    if launch.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted, indent=2))


def _load_evaluation(
    run_dir: Path, shapes: Sequence[TrainShape], settings: EvalSettings
) -> dict[str, Any] | None:
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    labels = {s.label for s in shapes}
    if (
        found["samples"] != settings.samples
        or set(found["accuracy"]) != labels
        or set(found.get("accuracy_twice", {})) != labels
    ):
        return None  # evaluated with other settings, or before the JRT prompt: evaluate again
    return found


def _row(
    spec: RunSpec,
    run_dir: Path,
    train_seconds: float,
    evaluation: dict[str, Any],
    shapes: Sequence[TrainShape],
) -> Row:
    return Row(
        name=spec.mixer,
        checkpoint=str(run_dir / MODEL_DIR),
        parameters=evaluation["parameters"],
        state=StateSize(**evaluation["state"]),
        accuracy={s: evaluation["accuracy"][s.label] for s in shapes},
        accuracy_twice={s: evaluation["accuracy_twice"][s.label] for s in shapes},
        mixer=spec.mixer,
        width=spec.width,
        learning_rate=spec.learning_rate,
        train_shape=spec.train_shape,
        train_seconds=train_seconds,
        seed=spec.seed,
    )


def execute_run(
    spec: RunSpec,
    run_dir: Path,
    shapes: Sequence[TrainShape],
    settings: EvalSettings,
    save_steps: int,
    progress_bars: bool = True,
    progress: Path | None = None,
) -> Row | None:
    """Train (unless finished before; resuming an interrupted run), then evaluate (unless evaluated
    before with the same shapes and samples). None on processes other than the main one.
    ``progress_bars``: the Trainer's bar (else its plain log lines); ``progress``: a file for the
    parent of a worker process, which draws the progress of all runs."""
    _claim(run_dir, spec)
    trained = load_train_result(run_dir)
    if trained is None:
        callbacks = [] if progress is None else [ProgressFile(progress)]
        trained = train_run(spec, run_dir, save_steps, progress_bars, callbacks)
    if not launch.is_main_process():
        return None  # the main process evaluates, once
    evaluation = _load_evaluation(run_dir, shapes, settings)
    if evaluation is None:
        if progress is not None:
            progress.write_text(json.dumps({"phase": "evaluating"}))
        result = evaluate_checkpoint(
            run_dir / MODEL_DIR, shapes, settings.samples, settings.batch_size, spec.train_shape.seq_len
        )
        if result is None:
            return None
        write_lm_eval_results(result, run_dir / LM_EVAL_FILE)
        evaluation = {
            "samples": settings.samples,
            "parameters": result.parameters,
            "state": asdict(result.state),
            "accuracy": {shape.label: acc for shape, acc in result.accuracy.items()},
            "accuracy_twice": {shape.label: acc for shape, acc in result.accuracy_twice.items()},
        }
        (run_dir / EVAL_FILE).write_text(json.dumps(evaluation, indent=2))
    return _row(spec, run_dir, trained.train_seconds, evaluation, shapes)


def _worker(
    spec: RunSpec,
    run_dir: Path,
    shapes: Sequence[TrainShape],
    settings: EvalSettings,
    save_steps: int,
    threads: int,
) -> Row | None:
    """``execute_run`` in a worker process, its output in the run's ``log.txt``."""
    torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (
        open(run_dir / LOG_FILE, "a") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        return execute_run(
            spec, run_dir, shapes, settings, save_steps, progress_bars=False, progress=run_dir / PROGRESS_FILE
        )


PARENT_POLL_SECONDS = 1.0


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initialiser: a daemon thread ends this worker once its parent is gone (killed, or
    ended by a signal that skips cleanup), so that no orphan trains on alone."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# seconds per training step relative to attention's on the CPU preset (docs/recall_gap.md)
RELATIVE_CPU_COST = {name: recipe.relative_cpu_cost for name, recipe in RECALL_GAP_ROWS.items()}


def distributed() -> bool:
    """Whether this process is one of several of a distributed launch (accelerate, torchrun, MPI)."""
    return launch.world_size() > 1


def _estimated_cost(spec: RunSpec) -> float:
    return (
        RELATIVE_CPU_COST.get(spec.mixer, 1.0)
        * spec.steps
        * spec.batch_size
        * spec.train_shape.seq_len
        * spec.width
    )


def start_order(specs: Sequence[RunSpec]) -> list[int]:
    """The order in which the worker processes start the runs: seed by seed (in the order given), so
    that an interrupted run of several seeds leaves whole seeds finished; within a seed longest
    first, so that no slow run starts last while the other workers idle."""
    seed_rank = {seed: rank for rank, seed in enumerate(dict.fromkeys(spec.seed for spec in specs))}
    return sorted(range(len(specs)), key=lambda i: (seed_rank[specs[i].seed], -_estimated_cost(specs[i])))


def _read_progress(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # not written yet, or being written
        return {}


def _run_parallel(
    specs: Sequence[RunSpec], out: Path, preset: Preset, settings: EvalSettings, save_steps: int, jobs: int
) -> list[Row]:
    """The runs in ``jobs`` worker processes (one CPU thread each, or an even share of the CPUs),
    one progress bar per run, drawn from the files the workers write."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    for spec in specs:  # a folder holding other runs is refused before any worker starts
        _claim(out / RUNS_DIR / spec.name, spec)
    context = multiprocessing.get_context("spawn")
    rows: dict[int, Row] = {}
    bars = [Progress(spec.steps, f"{spec.name}: waiting") for spec in specs]
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),)
    )
    try:
        _collect(specs, out, preset, settings, save_steps, threads, pool, rows, bars)
    except BaseException:
        # a failed run or an interrupt ends the others now: the pool's shutdown would wait for them
        for worker in multiprocessing.active_children():
            worker.terminate()
        raise
    finally:
        pool.shutdown(cancel_futures=True)
    for bar in bars:
        bar.close()
    return [rows[i] for i in range(len(specs))]


def _collect(
    specs: Sequence[RunSpec],
    out: Path,
    preset: Preset,
    settings: EvalSettings,
    save_steps: int,
    threads: int,
    pool: ProcessPoolExecutor,
    rows: dict[int, Row],
    bars: list[Progress],
) -> None:
    """Submit every run to ``pool`` (longest first), fill ``rows`` as they finish and draw ``bars``."""
    futures: dict[Future, int] = {}
    for i in start_order(specs):
        spec = specs[i]
        run_dir = out / RUNS_DIR / spec.name
        (run_dir / PROGRESS_FILE).unlink(missing_ok=True)
        args = (spec, run_dir, preset.eval_shapes(spec.train_shape), settings, save_steps, threads)
        futures[pool.submit(_worker, *args)] = i
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        for future in done:
            i = futures[future]
            error = future.exception()
            if error is not None:
                log = out / RUNS_DIR / specs[i].name / LOG_FILE
                # bad settings and diverged training keep their type: the command reports them in a line
                kind = (
                    type(error) if isinstance(error, (ValueError, NonFiniteTrainingError)) else RuntimeError
                )
                raise kind(f"run {specs[i].name} failed: {error}; its output is in {log}") from error
            rows[i] = future.result()
            bars[i].set(specs[i].steps, f"{specs[i].name}: done")
        for i in (futures[f] for f in pending):
            state = _read_progress(out / RUNS_DIR / specs[i].name / PROGRESS_FILE)
            if "step" in state:
                bars[i].set(state["step"], f"{specs[i].name}: training")
            elif state.get("phase") == "evaluating":
                bars[i].set(specs[i].steps, f"{specs[i].name}: evaluating")


def run_all(
    specs: Sequence[RunSpec], out: Path, preset: Preset, settings: EvalSettings, save_steps: int, jobs: int
) -> list[Row]:
    """Every run, in the given order; ``jobs`` > 1 runs them in worker processes (CPU only: a
    distributed launch runs one at a time, all processes together). Only the main process gets rows."""
    single_process_only = torch.cuda.is_available() or distributed()
    if jobs > 1 and single_process_only:
        raise ValueError("jobs > 1 runs several trainings side by side on CPU; use 1 with GPUs or accelerate")
    if jobs > 1 or not (on_terminal() or single_process_only):
        # off a terminal the runs go to worker processes too, whose own output (the dependencies'
        # progress bars and notes) lands in each run's log.txt, leaving the console plain lines
        return _run_parallel(specs, out, preset, settings, save_steps, jobs)
    rows = []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        row = execute_run(
            spec,
            out / RUNS_DIR / spec.name,
            preset.eval_shapes(spec.train_shape),
            settings,
            save_steps,
            progress_bars=on_terminal(),
        )
        print(
            f"[{i}/{len(specs)}] {spec.name}: {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if row is not None:
            rows.append(row)
    return rows


def checkpoint_names(checkpoints: Sequence[str]) -> list[str]:
    """Short unique names: each checkpoint's shortest trailing run of path parts that no other
    checkpoint ends with (``run-a/model``, ``llama``)."""
    if len(set(checkpoints)) != len(checkpoints):
        raise ValueError(f"--checkpoints names a checkpoint twice: {list(checkpoints)}")
    parts = [Path(c.rstrip("/")).parts or (c,) for c in checkpoints]

    def suffix(own: tuple[str, ...], count: int) -> str:
        return "/".join(own[-count:])

    names = []
    for own in parts:
        others = [p for p in parts if p is not own]
        count = next(
            (n for n in range(1, len(own)) if all(suffix(p, n) != suffix(own, n) for p in others)), len(own)
        )
        names.append(suffix(own, count))
    return names


def evaluate_checkpoints(
    checkpoints: Sequence[str], shapes: Sequence[TrainShape], settings: EvalSettings, out: Path
) -> list[Row]:
    """Rows for existing checkpoints (local folders or hub names), named by :func:`checkpoint_names`;
    their lm-eval results are written to ``OUT/checkpoints/NAME.json``."""
    rows = []
    state_length = min(s.seq_len for s in shapes)
    for name, checkpoint in zip(checkpoint_names(checkpoints), checkpoints, strict=True):
        result = evaluate_checkpoint(checkpoint, shapes, settings.samples, settings.batch_size, state_length)
        if result is None:
            continue
        write_lm_eval_results(result, out / "checkpoints" / f"{name.replace('/', '__')}.json")
        rows.append(
            Row(
                name,
                checkpoint,
                result.parameters,
                result.state,
                result.accuracy,
                accuracy_twice=result.accuracy_twice,
            )
        )
    return rows
