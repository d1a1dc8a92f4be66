"""``ttt-mixer plot``: figures of lm-eval results scored per context length or per position.

The ``ttt_recall`` tasks score each context length under its own key (``acc@128``,
``exact_match@1024``) and the perplexity-by-position task scores each position bucket under one
(``ppl@0-512``): in an lm-eval results JSON these read ``"<metric>@<x>,<filter>"`` in
``results[task]``, next to ``"<metric>@<x>_stderr,<filter>"``. :func:`plot_results` draws one PNG per
(task, metric, filter), with one line per results file (one model each): the metric against the
context length ``x``, or against the middle of the bucket ``a``-``b``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# "<metric>@<length>,<filter>" or "<metric>@<start>-<end>,<filter>"; stderr keys do not match
METRIC_KEY = re.compile(r"^(?P<metric>.+)@(?P<start>\d+)(?:-(?P<end>\d+))?,(?P<filter>.+)$")


class PlotError(ValueError):
    """A results file that cannot be plotted, with the reason."""


@dataclass
class Point:
    start: int
    end: int | None  # None: a context length; else the bucket [start, end)
    value: float
    stderr: float | None

    @property
    def x(self) -> float:
        return self.start if self.end is None else (self.start + self.end) / 2


@dataclass
class Series:
    """One model's points of one (task, metric, filter)."""

    label: str
    points: list[Point] = field(default_factory=list)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def load_results(path: Path) -> dict[str, Any]:
    """An lm-eval results JSON, checked to hold a ``results`` mapping of tasks."""
    path = Path(path)
    if path.is_dir():
        raise PlotError(f"{path} is a folder; pass the results_*.json files that lm-eval wrote in it")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlotError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlotError(f"{path} is not an lm-eval results JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise PlotError(f"{path} is not an lm-eval results JSON: it has no 'results' mapping of tasks")
    if not all(isinstance(v, dict) for v in data["results"].values()):
        raise PlotError(f"{path} is not an lm-eval results JSON: 'results' must map tasks to metrics")
    return data


def model_label(results: Mapping[str, Any], path: Path) -> str:
    """The model's name: ``model_name``, else ``pretrained`` of ``config.model_args`` (a dict or
    lm-eval's ``key=value,...`` string), else the file's stem; local paths shortened to their last
    component."""
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    model_args = config.get("model_args")
    if isinstance(model_args, str):
        model_args = dict(arg.split("=", 1) for arg in model_args.split(",") if "=" in arg)
    pretrained = model_args.get("pretrained") if isinstance(model_args, dict) else None
    name = results.get("model_name") or pretrained
    if not isinstance(name, str) or not name:
        return Path(path).stem
    if name.startswith(("/", ".", "~")) or Path(name).exists():
        return Path(name).name or name
    return name


def plottable_metrics(results: Mapping[str, Any]) -> dict[tuple[str, str, str], list[Point]]:
    """``{(task, metric, filter): points}`` of the per-length and per-bucket keys of ``results``,
    points sorted along x."""
    found: dict[tuple[str, str, str], list[Point]] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            match = METRIC_KEY.match(key)
            number = _number(value)
            if match is None or number is None:
                continue
            metric, start, end, filter_ = match.group("metric", "start", "end", "filter")
            stderr = _number(metrics.get(f"{metric}@{start}{f'-{end}' if end else ''}_stderr,{filter_}"))
            point = Point(int(start), int(end) if end else None, number, stderr)
            found.setdefault((task, metric, filter_), []).append(point)
    return {key: sorted(points, key=lambda p: (p.x, p.start)) for key, points in found.items()}


def _file_name(task: str, metric: str, filter_: str) -> str:
    name = f"{task}_{metric}" + ("" if filter_ == "none" else f"_{filter_}")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png"


def _unique_labels(labels: Sequence[str], paths: Sequence[Path]) -> list[str]:
    """Labels, with the file's stem added to any that two files share."""
    return [
        label if labels.count(label) == 1 else f"{label} ({Path(path).stem})"
        for label, path in zip(labels, paths, strict=True)
    ]


def plot_results(paths: Iterable[str | Path], out_dir: str | Path) -> list[Path]:
    """Write one PNG per (task, metric, filter) found in the lm-eval results files ``paths`` (one line
    per file) into ``out_dir``; returns the paths written. Raises :class:`PlotError` for a file that
    is not an lm-eval results JSON or has no per-length or per-bucket metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [Path(p) for p in paths]
    if not paths:
        raise PlotError("no results files given")
    loaded = [load_results(path) for path in paths]
    per_file = []
    for path, results in zip(paths, loaded, strict=True):
        metrics = plottable_metrics(results)
        if not metrics:
            raise PlotError(
                f"{path} has no plottable metric: no key '<metric>@<length>' or '<metric>@<start>-<end>' "
                f"in the results of its tasks ({', '.join(results['results']) or 'none'})"
            )
        per_file.append(metrics)
    labels = _unique_labels([model_label(r, p) for r, p in zip(loaded, paths, strict=True)], paths)

    figures: dict[tuple[str, str, str], list[Series]] = {}
    for label, metrics in zip(labels, per_file, strict=True):
        for key, points in metrics.items():
            figures.setdefault(key, []).append(Series(label, points))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (task, metric, filter_), series in sorted(figures.items()):
        buckets = all(p.end is not None for s in series for p in s.points)
        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        for line in series:
            xs = [p.x for p in line.points]
            ys = [p.value for p in line.points]
            errors = [p.stderr or 0.0 for p in line.points]
            axes.errorbar(
                xs, ys, yerr=errors if any(errors) else None, marker="o", capsize=3, label=line.label
            )
        xs = [p.x for s in series for p in s.points]
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            axes.set_xscale("log", base=2)
        ticks = {
            p.x: str(p.start) if p.end is None else f"{p.start}-{p.end}" for s in series for p in s.points
        }
        if len(ticks) <= 12:  # the measured lengths or buckets, named
            axes.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
            axes.minorticks_off()
        values = [p.value for s in series for p in s.points]
        if "ppl" in metric or "perplexity" in metric:
            if min(values) > 0 and max(values) / min(values) >= 10:
                axes.set_yscale("log")
        elif min(values) >= 0 and max(values) <= 1:
            axes.set_ylim(-0.03, 1.03)
        axes.set_xlabel("position in the sequence (bucket middle)" if buckets else "context length")
        axes.set_ylabel(metric if filter_ == "none" else f"{metric} ({filter_})")
        axes.set_title(f"{task}: {metric} vs {'position' if buckets else 'context length'}")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = out_dir / _file_name(task, metric, filter_)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
