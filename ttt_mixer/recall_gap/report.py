"""The results of ``ttt-mixer recall-gap``: one row per evaluated model, written as a markdown table,
a JSON file and a PNG (accuracy against evaluation length, accuracy against recurrent state size),
and a second markdown table: the accuracy with the JRT prompt (the pairs read twice) and its change.

With a learning-rate sweep, every (mixer, width, training shape, seed) keeps its best run at the
training shape (Zoology's protocol); the JSON holds every run. Models trained on different shapes get
separate tables and panels, since they are evaluated at different shapes. Trained over several seeds,
each (mixer, width, training shape) is one :class:`OverSeeds`: the table gives per column the median
and the range over the seeds and in how many seeds the model learned its training shape, the plot the
medians, and the JSON every seed's figures as well.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttt_mixer.recall_gap.evaluate import StateSize
from ttt_mixer.recall_gap.presets import TASK_TITLES, TrainShape

TABLE_MD, TABLE_JSON, PLOT_PNG = "recall_gap.md", "recall_gap.json", "recall_gap.png"


@dataclass(frozen=True)
class Row:
    """One evaluated model. ``mixer``, ``width``, ``learning_rate``, ``train_shape`` and
    ``train_seconds`` are None for a checkpoint that was evaluated, not trained, here."""

    name: str
    checkpoint: str
    parameters: int
    state: StateSize
    accuracy: dict[TrainShape, float]
    mixer: str | None = None
    width: int | None = None
    learning_rate: float | None = None
    train_shape: TrainShape | None = None
    train_seconds: float | None = None
    # with the JRT prompt: the key-value pairs given twice before the queries (ttt_mqar_twice)
    accuracy_twice: dict[TrainShape, float] = field(default_factory=dict)
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mixer": self.mixer,
            "seed": self.seed,
            "width": self.width,
            "learning_rate": self.learning_rate,
            "train_shape": None if self.train_shape is None else self.train_shape.label,
            "parameters": self.parameters,
            "state_size": self.state.numbers,
            "state_grows_with_length": self.state.grows,
            "state_size_at_length": self.state.at_length,
            "accuracy": {shape.label: acc for shape, acc in sorted(self.accuracy.items())},
            "accuracy_twice": {shape.label: acc for shape, acc in sorted(self.accuracy_twice.items())},
            "train_seconds": self.train_seconds,
            "checkpoint": self.checkpoint,
        }


def _model_key(row: Row) -> tuple[Any, ...]:
    return (row.mixer or row.name, row.width, row.train_shape)


def best_rows(rows: Iterable[Row]) -> list[Row]:
    """Per (mixer or name, width, training shape, seed), the run with the best accuracy at its
    training shape (checkpoints: each its own), in first-seen order."""
    best: dict[tuple[Any, ...], Row] = {}
    for row in rows:
        key = (*_model_key(row), row.seed)
        score = row.accuracy.get(row.train_shape, -1.0) if row.train_shape else 0.0
        kept = best.get(key)
        if kept is None or score > kept.accuracy.get(kept.train_shape, -1.0):
            best[key] = row
    return list(best.values())


@dataclass(frozen=True)
class Spread:
    """Median and range of one figure over seeds."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(statistics.median(values), min(values), max(values))

    def text(self) -> str:
        """``median (low-high)``, or the one figure when all seeds gave it."""
        if self.low == self.high:
            return f"{self.median:.3f}"
        return f"{self.median:.3f} ({self.low:.3f}-{self.high:.3f})"


@dataclass(frozen=True)
class OverSeeds:
    """One trained (mixer, width, training shape) over several seeds: each seed's (best) row, in
    seed order as given."""

    rows: tuple[Row, ...]

    def __post_init__(self) -> None:
        keys = {_model_key(row) for row in self.rows}
        seeds = [row.seed for row in self.rows]
        if len(keys) != 1 or self.rows[0].train_shape is None:
            raise ValueError("OverSeeds takes the trained rows of one (mixer, width, training shape)")
        if None in seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"OverSeeds takes one row per seed, got seeds {seeds}")

    @property
    def first(self) -> Row:
        return self.rows[0]

    @property
    def seeds(self) -> list[int]:
        return [row.seed for row in self.rows if row.seed is not None]

    def shapes(self) -> list[TrainShape]:
        return sorted({shape for row in self.rows for shape in row.accuracy})

    def spread(self, shape: TrainShape) -> Spread:
        return Spread.of([row.accuracy[shape] for row in self.rows if shape in row.accuracy])

    def learned(self, learned_accuracy: float) -> int:
        """In how many seeds the model reached ``learned_accuracy`` at its training shape."""
        return len(self.rows) - len(not_learned(self.rows, learned_accuracy))

    def learning_rates(self) -> list[float]:
        return sorted({row.learning_rate for row in self.rows if row.learning_rate is not None})

    def median_row(self) -> Row:
        """The first seed's row with each accuracy the median over the seeds (for the plot)."""
        accuracy = {shape: self.spread(shape).median for shape in self.shapes()}
        return dataclasses.replace(self.first, accuracy=accuracy, seed=None)

    def to_json(self, learned_accuracy: float) -> dict[str, Any]:
        seconds = [row.train_seconds for row in self.rows if row.train_seconds is not None]
        first = self.first.to_json()
        return {
            **{key: first[key] for key in ("name", "mixer", "width", "train_shape", "parameters")},
            **{key: first[key] for key in ("state_size", "state_grows_with_length", "state_size_at_length")},
            "learning_rates": self.learning_rates(),
            "seeds": self.seeds,
            "learned_accuracy": learned_accuracy,
            "learned_seeds": self.learned(learned_accuracy),
            "accuracy": {
                shape.label: {
                    **dataclasses.asdict(self.spread(shape)),
                    "per_seed": {str(row.seed): row.accuracy[shape] for row in self.rows},
                }
                for shape in self.shapes()
            },
            "train_seconds_median": statistics.median(seconds) if seconds else None,
        }


def over_seeds(rows: Iterable[Row]) -> list[OverSeeds]:
    """The trained rows (one per seed: ``best_rows``'s) grouped per (mixer, width, training
    shape), in first-seen order; checkpoints (untrained rows) are left out."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        if row.train_shape is not None:
            groups.setdefault(_model_key(row), []).append(row)
    return [OverSeeds(tuple(group)) for group in groups.values()]


def several_seeds(rows: Iterable[Row]) -> bool:
    """Whether the rows were trained with more than one seed."""
    return len({row.seed for row in rows if row.train_shape is not None}) > 1


def _groups(rows: Sequence[Row]) -> dict[TrainShape | None, list[Row]]:
    groups: dict[TrainShape | None, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.train_shape, []).append(row)
    return groups


def _column_order(shapes: Iterable[TrainShape], train_shape: TrainShape | None) -> list[TrainShape]:
    """The training's pair count (set order) first (by length), then the other shapes (by length)."""
    series = train_shape.series if train_shape else min(s.series for s in shapes)
    return sorted(shapes, key=lambda s: (s.series != series, s.seq_len, s.series))


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def _state_text(state: StateSize) -> str:
    if state.numbers is None:
        return "unknown"
    if state.grows:
        return f"{state.numbers:,} (KV cache at {state.at_length} tokens, grows)"
    return f"{state.numbers:,}"


def not_learned(rows: Iterable[Row], learned_accuracy: float) -> list[Row]:
    """Trained rows below ``learned_accuracy`` at their training shape: models that did not learn the
    task they were trained on, whose other accuracies say nothing about what their mixer can recall."""
    return [row for row in rows if row.train_shape and row.accuracy[row.train_shape] < learned_accuracy]


def _not_learned_note(group: Sequence[Row], learned_accuracy: float | None) -> list[str]:
    below = [] if learned_accuracy is None else not_learned(group, learned_accuracy)
    if not below:
        return []
    names = ", ".join(f"{row.name} ({row.accuracy[row.train_shape]:.3f})" for row in below)
    return [
        "",
        f"Not learned (below {learned_accuracy:g} at the training shape): {names}. Their other columns "
        "measure an undertrained model, not what the mixer can recall.",
    ]


def markdown_table(rows: Sequence[Row], learned_accuracy: float | None = None) -> str:
    """One markdown table per training shape: mixer, width (when several), learning rate (of
    trained models), parameters, state size, accuracy per evaluated shape, training time (of
    trained models); under it, with ``learned_accuracy``, the trained rows below it at their
    training shape (``not_learned``)."""
    parts = []
    for train_shape, group in _groups(rows).items():
        if train_shape is not None and several_seeds(group):
            parts.append(_seeds_table(over_seeds(group), train_shape, learned_accuracy))
            continue
        shapes = _column_order({shape for row in group for shape in row.accuracy}, train_shape)
        widths = len({row.width for row in group}) > 1
        trained = train_shape is not None
        header = ["mixer", *(["width"] if widths else []), *(["learning rate"] if trained else [])]
        header += ["parameters", "recurrent state size", *(s.header for s in shapes)]
        header += ["training time"] if trained else []
        lines = [
            f"Trained on {train_shape.title} {train_shape.label}:" if trained else "Evaluated checkpoints:",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        for row in group:
            cells = [row.name, *([str(row.width)] if widths else [])]
            cells += [f"{row.learning_rate:g}"] if trained else []
            cells += [f"{row.parameters:,}", _state_text(row.state)]
            cells += [f"{row.accuracy[s]:.3f}" if s in row.accuracy else "" for s in shapes]
            cells += [_seconds_text(row.train_seconds)] if trained else []
            lines.append("| " + " | ".join(cells) + " |")
        lines += _not_learned_note(group, learned_accuracy)
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def jrt_prompt_table(rows: Sequence[Row]) -> str:
    """One markdown table per training shape of the rows evaluated with the JRT prompt: per mixer and
    evaluated shape, the accuracy with the pairs read twice and its change from reading them once;
    empty when no row has one."""
    parts = []
    for train_shape, group in _groups([row for row in rows if row.accuracy_twice]).items():
        shapes = _column_order({shape for row in group for shape in row.accuracy_twice}, train_shape)
        widths = len({row.width for row in group}) > 1
        header = ["mixer", *(["width"] if widths else []), *(s.header for s in shapes)]
        where = (
            f"trained on {train_shape.title} {train_shape.label}" if train_shape else "evaluated checkpoints"
        )
        lines = [
            f"JRT prompt, {shapes[0].read_twice} read twice ({where}): accuracy (change from reading once):",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        seeds = several_seeds(group)
        for row in group:
            name = f"{row.name} (seed {row.seed})" if seeds else row.name
            cells = [name, *([str(row.width)] if widths else [])]
            cells += [
                f"{row.accuracy_twice[s]:.3f} ({row.accuracy_twice[s] - row.accuracy[s]:+.3f})"
                if s in row.accuracy_twice and s in row.accuracy
                else ""
                for s in shapes
            ]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n" if parts else ""


def _seeds_table(groups: Sequence[OverSeeds], train_shape: TrainShape, learned_accuracy: float | None) -> str:
    """``markdown_table``'s table of models trained over several seeds: per accuracy column the median
    (the range over the seeds), with ``learned_accuracy`` the seeds that reached it at the training
    shape, and the median training time."""
    shapes = _column_order({shape for group in groups for shape in group.shapes()}, train_shape)
    widths = len({group.first.width for group in groups}) > 1
    header = ["mixer", *(["width"] if widths else []), "learning rate", "parameters", "recurrent state size"]
    if learned_accuracy is not None:
        header.append(f"learned (>= {learned_accuracy:g} at {train_shape.label})")
    header += [s.header for s in shapes]
    header.append("training time (median)")
    counts = {len(group.rows) for group in groups}
    seeds_text = f"{counts.pop()} seeds" if len(counts) == 1 else "several seeds"
    lines = [
        f"Trained on {train_shape.title} {train_shape.label} over {seeds_text}; accuracy: median (range over the seeds):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    below = []
    for group in groups:
        first = group.first
        cells = [first.name, *([str(first.width)] if widths else [])]
        cells += ["/".join(f"{lr:g}" for lr in group.learning_rates())]
        cells += [f"{first.parameters:,}", _state_text(first.state)]
        if learned_accuracy is not None:
            cells.append(f"{group.learned(learned_accuracy)} of {len(group.rows)} seeds")
            below += [(first.name, row) for row in not_learned(group.rows, learned_accuracy)]
        cells += [group.spread(s).text() if any(s in r.accuracy for r in group.rows) else "" for s in shapes]
        seconds = [row.train_seconds for row in group.rows if row.train_seconds is not None]
        cells.append(_seconds_text(statistics.median(seconds)) if seconds else "")
        lines.append("| " + " | ".join(cells) + " |")
    if below:
        names = ", ".join(f"{name} seed {row.seed} ({row.accuracy[train_shape]:.3f})" for name, row in below)
        lines += [
            "",
            f"Not learned (below {learned_accuracy:g} at the training shape): {names}. Those seeds' other "
            "columns measure an undertrained model, not what the mixer can recall.",
        ]
    return "\n".join(lines)


def write_tables(
    rows: Sequence[Row],
    all_rows: Sequence[Row],
    out: Path,
    info: dict[str, Any],
    learned_accuracy: float | None = None,
) -> list[Path]:
    """``recall_gap.md`` (``rows``, with ``info['summary']`` above it; see ``markdown_table``; then
    ``jrt_prompt_table``) and ``recall_gap.json`` (``info``, ``rows`` and every run in ``all_rows``;
    trained over several seeds, also ``over_seeds``: per model the median, range and every seed's
    accuracy per shape)."""
    md, js = out / TABLE_MD, out / TABLE_JSON
    table = markdown_table(rows, learned_accuracy)
    twice = jrt_prompt_table(rows)
    title = TASK_TITLES[info["task"]]
    md.write_text(
        f"# {title} recall gap\n\n{info.get('summary', '')}\n\n{table}" + (f"\n{twice}" if twice else "")
    )
    data = {**info, "rows": [row.to_json() for row in rows]}
    if several_seeds(rows):
        bar = 0.0 if learned_accuracy is None else learned_accuracy
        data["over_seeds"] = [group.to_json(bar) for group in over_seeds(rows)]
    data["runs"] = [row.to_json() for row in all_rows]
    js.write_text(json.dumps(data, indent=2))
    return [md, js]


def plot(rows: Sequence[Row], out: Path) -> Path:
    """``recall_gap.png``: per training shape, accuracy against evaluation length (solid: the
    training's pairs; dashed: pairs scaled with the length) and accuracy against state size (filled:
    at the training shape; hollow: at the hardest evaluated shape; lines join widths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if several_seeds(rows):  # trained rows as their medians over the seeds
        untrained = [row for row in rows if row.train_shape is None]
        rows = [group.median_row() for group in over_seeds(rows)] + untrained
    groups = _groups(rows)
    figure, axes = plt.subplots(len(groups), 2, figsize=(13, 4.8 * len(groups)), squeeze=False)
    names = list(dict.fromkeys(row.mixer or row.name for row in rows))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    for line, (train_shape, group) in enumerate(groups.items()):
        title = f"trained on {train_shape.label}" if train_shape else "checkpoints"
        _plot_lengths(axes[line, 0], group, train_shape, colors, title)
        _plot_states(axes[line, 1], group, train_shape, colors, title)
    figure.tight_layout()
    path = out / PLOT_PNG
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _label_accuracy_axes(axes: Any, xlabel: str, title: str, task_title: str) -> None:
    """What every accuracy plot has: the accuracy axis from 0 to 1, the labels, a grid and the legend."""
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(f"{task_title} accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _plot_lengths(
    axes: Any, group: Sequence[Row], train_shape: TrainShape | None, colors: dict, title: str
) -> None:
    widest = max((row.width or 0) for row in group)
    for row in group:
        if (row.width or 0) != widest:
            continue
        color = colors[row.mixer or row.name]
        base = train_shape or min(row.accuracy)
        same = sorted(s for s in row.accuracy if s.series == base.series)
        scaled = sorted(s for s in row.accuracy if base.on_dashed_line(s))
        axes.plot(
            [s.seq_len for s in same], [row.accuracy[s] for s in same], "o-", color=color, label=row.name
        )
        if len(scaled) > 1:
            axes.plot([s.seq_len for s in scaled], [row.accuracy[s] for s in scaled], "s--", color=color)
    shapes = {s for row in group for s in row.accuracy}
    lengths = sorted({s.seq_len for s in shapes})
    axes.set_xscale("log", base=2)
    axes.set_xticks(lengths, [str(n) for n in lengths])
    axes.minorticks_off()
    shape = train_shape or min(shapes)
    _label_accuracy_axes(
        axes,
        f"evaluation length (symbols); dashed: {shape.dashed}",
        f"accuracy vs length ({title})",
        shape.title,
    )


def _state_at(state: StateSize, length: int) -> int | None:
    """The state after reading ``length`` symbols: an attention cache grows in proportion."""
    if state.numbers is None or not state.grows or state.at_length is None:
        return state.numbers
    return state.numbers * length // state.at_length


def _plot_states(
    axes: Any, group: Sequence[Row], train_shape: TrainShape | None, colors: dict, title: str
) -> None:
    shapes = sorted({s for row in group for s in row.accuracy})
    reference = train_shape or shapes[0]
    hardest = max(shapes, key=lambda s: (s.series, s.seq_len))
    by_name: dict[str, list[Row]] = {}
    for row in group:
        if row.state.numbers is not None:
            by_name.setdefault(row.mixer or row.name, []).append(row)
    for name, named in by_name.items():
        named.sort(key=lambda r: r.state.numbers or 0)
        label = name + (" (KV cache at that length)" if named[0].state.grows else "")
        for shape, style, fill in ((reference, "o-", colors[name]), (hardest, "o--", "none")):
            values = [r.accuracy.get(shape, math.nan) for r in named]
            axes.plot(
                [_state_at(r.state, shape.seq_len) for r in named],
                values,
                style,
                color=colors[name],
                markerfacecolor=fill,
                label=label if fill != "none" else None,
            )
    axes.set_xscale("log", base=2)
    _label_accuracy_axes(
        axes,
        "recurrent state size (numbers per sequence, all layers)",
        f"accuracy vs state size ({title})\nfilled: {reference.label}; hollow: {hardest.label}",
        reference.title,
    )
