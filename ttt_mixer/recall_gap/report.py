"""The results of ``ttt-mixer recall-gap``: one row per evaluated model, written as a markdown table,
a JSON file and a PNG (accuracy against evaluation length, accuracy against recurrent state size),
and a second markdown table: the accuracy with the JRT prompt (the pairs read twice) and its change.

With a learning-rate sweep, every (mixer, width, training shape) keeps its best run at the training
shape (Zoology's protocol); the JSON holds every run. Models trained on different shapes get
separate tables and panels, since they are evaluated at different shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttt_mixer.recall_gap.evaluate import StateSize
from ttt_mixer.recall_gap.presets import MQARShape

TABLE_MD, TABLE_JSON, PLOT_PNG = "recall_gap.md", "recall_gap.json", "recall_gap.png"


@dataclass(frozen=True)
class Row:
    """One evaluated model. ``mixer``, ``width``, ``learning_rate``, ``train_shape`` and
    ``train_seconds`` are None for a checkpoint that was evaluated, not trained, here."""

    name: str
    checkpoint: str
    parameters: int
    state: StateSize
    accuracy: dict[MQARShape, float]
    mixer: str | None = None
    width: int | None = None
    learning_rate: float | None = None
    train_shape: MQARShape | None = None
    train_seconds: float | None = None
    # with the JRT prompt: the key-value pairs given twice before the queries (ttt_mqar_twice)
    accuracy_twice: dict[MQARShape, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mixer": self.mixer,
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


def best_rows(rows: Iterable[Row]) -> list[Row]:
    """Per (mixer or name, width, training shape), the run with the best accuracy at its training
    shape (checkpoints: each its own), in first-seen order."""
    best: dict[tuple[Any, ...], Row] = {}
    for row in rows:
        key = (row.mixer or row.name, row.width, row.train_shape)
        score = row.accuracy.get(row.train_shape, -1.0) if row.train_shape else 0.0
        kept = best.get(key)
        if kept is None or score > kept.accuracy.get(kept.train_shape, -1.0):
            best[key] = row
    return list(best.values())


def _groups(rows: Sequence[Row]) -> dict[MQARShape | None, list[Row]]:
    groups: dict[MQARShape | None, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.train_shape, []).append(row)
    return groups


def _column_order(shapes: Iterable[MQARShape], train_shape: MQARShape | None) -> list[MQARShape]:
    """The training's pair count first (by length), then the other shapes (by length)."""
    pairs = train_shape.num_kv_pairs if train_shape else min(s.num_kv_pairs for s in shapes)
    return sorted(shapes, key=lambda s: (s.num_kv_pairs != pairs, s.seq_len, s.num_kv_pairs))


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def _state_text(state: StateSize) -> str:
    if state.numbers is None:
        return "unknown"
    if state.grows:
        return f"{state.numbers:,} (KV cache at {state.at_length} tokens, grows)"
    return f"{state.numbers:,}"


def _shape_header(shape: MQARShape) -> str:
    return f"acc L={shape.seq_len} kv={shape.num_kv_pairs}"


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
        shapes = _column_order({shape for row in group for shape in row.accuracy}, train_shape)
        widths = len({row.width for row in group}) > 1
        trained = train_shape is not None
        header = ["mixer", *(["width"] if widths else []), *(["learning rate"] if trained else [])]
        header += ["parameters", "recurrent state size", *(_shape_header(s) for s in shapes)]
        header += ["training time"] if trained else []
        lines = [
            f"Trained on MQAR {train_shape.label}:" if trained else "Evaluated checkpoints:",
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
        header = ["mixer", *(["width"] if widths else []), *(_shape_header(s) for s in shapes)]
        where = f"trained on MQAR {train_shape.label}" if train_shape else "evaluated checkpoints"
        lines = [
            f"JRT prompt, the key-value pairs read twice ({where}): accuracy (change from reading once):",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        for row in group:
            cells = [row.name, *([str(row.width)] if widths else [])]
            cells += [
                f"{row.accuracy_twice[s]:.3f} ({row.accuracy_twice[s] - row.accuracy[s]:+.3f})"
                if s in row.accuracy_twice and s in row.accuracy
                else ""
                for s in shapes
            ]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n" if parts else ""


def write_tables(
    rows: Sequence[Row],
    all_rows: Sequence[Row],
    out: Path,
    info: dict[str, Any],
    learned_accuracy: float | None = None,
) -> list[Path]:
    """``recall_gap.md`` (``rows``, with ``info['summary']`` above it; see ``markdown_table``; then
    ``jrt_prompt_table``) and
    ``recall_gap.json`` (``info``, ``rows`` and every run in ``all_rows``)."""
    md, js = out / TABLE_MD, out / TABLE_JSON
    table = markdown_table(rows, learned_accuracy)
    twice = jrt_prompt_table(rows)
    md.write_text(
        f"# MQAR recall gap\n\n{info.get('summary', '')}\n\n{table}" + (f"\n{twice}" if twice else "")
    )
    data = {**info, "rows": [row.to_json() for row in rows], "runs": [row.to_json() for row in all_rows]}
    js.write_text(json.dumps(data, indent=2))
    return [md, js]


def plot(rows: Sequence[Row], out: Path) -> Path:
    """``recall_gap.png``: per training shape, accuracy against evaluation length (solid: the
    training's pairs; dashed: pairs scaled with the length) and accuracy against state size (filled:
    at the training shape; hollow: at the hardest evaluated shape; lines join widths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _label_accuracy_axes(axes: Any, xlabel: str, title: str) -> None:
    """What every accuracy plot has: the accuracy axis from 0 to 1, the labels, a grid and the legend."""
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("MQAR accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _plot_lengths(
    axes: Any, group: Sequence[Row], train_shape: MQARShape | None, colors: dict, title: str
) -> None:
    widest = max((row.width or 0) for row in group)
    for row in group:
        if (row.width or 0) != widest:
            continue
        color = colors[row.mixer or row.name]
        base = train_shape or min(row.accuracy)
        same = sorted(s for s in row.accuracy if s.num_kv_pairs == base.num_kv_pairs)
        # the same density of pairs per symbol as the base shape
        scaled = sorted(
            s for s in row.accuracy if s.num_kv_pairs * base.seq_len == base.num_kv_pairs * s.seq_len
        )
        axes.plot(
            [s.seq_len for s in same], [row.accuracy[s] for s in same], "o-", color=color, label=row.name
        )
        if len(scaled) > 1:
            axes.plot([s.seq_len for s in scaled], [row.accuracy[s] for s in scaled], "s--", color=color)
    lengths = sorted({s.seq_len for row in group for s in row.accuracy})
    axes.set_xscale("log", base=2)
    axes.set_xticks(lengths, [str(n) for n in lengths])
    axes.minorticks_off()
    _label_accuracy_axes(
        axes,
        "evaluation length (symbols); dashed: key-value pairs scaled with the length",
        f"accuracy vs length ({title})",
    )


def _state_at(state: StateSize, length: int) -> int | None:
    """The state after reading ``length`` symbols: an attention cache grows in proportion."""
    if state.numbers is None or not state.grows or state.at_length is None:
        return state.numbers
    return state.numbers * length // state.at_length


def _plot_states(
    axes: Any, group: Sequence[Row], train_shape: MQARShape | None, colors: dict, title: str
) -> None:
    shapes = sorted({s for row in group for s in row.accuracy})
    reference = train_shape or shapes[0]
    hardest = max(shapes, key=lambda s: (s.num_kv_pairs, s.seq_len))
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
    )
