"""``ttt-mixer recall-gap``: train the mixers of a preset (``presets``) in one backbone on
MQAR (or, with ``--task set_disjointness``, set disjointness), evaluate each through lm-eval at the
training length and at 2x and 4x it, and report the recall gap as tables and a plot.

Modules: ``presets`` (the CPU default and the GPU Zoology sweep), ``data`` (MQAR training data and
the word-level tokenizer), ``set_disjointness`` (its shapes, recipe and training data), ``train`` (one run through transformers' Trainer), ``evaluate`` (lm-eval
on a saved checkpoint), ``runner`` (the runs, resumed and in parallel) and ``report`` (tables, plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttt_mixer.arguments import comma_list, non_negative_int, positive_int
from ttt_mixer.paths import checkpoint_source
from ttt_mixer.recall_gap.presets import CPU, PRESETS, ROW_NAMES, TASKS, MQARShape, Preset

# the help lists the mixers from the registry the runs use, and the model rows (presets.ROW_NAMES),
# so it cannot drift from the code
DESCRIPTION = (
    f"Train sequence mixers in one backbone on MQAR (the default: {', '.join(CPU.mixers)}; "
    f"--mixers takes any of {', '.join(ROW_NAMES)}) or, with --task set_disjointness, on set "
    "disjointness, evaluate each through lm-eval at the training length and at 2x and 4x it, and report "
    "the recall gap as tables and a plot."
)


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a learning rate, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a learning rate must be in (0, 1), got {value}")
    return value


SEEDS_FORM = "a comma-separated list of integers >= 0 and ranges FIRST-LAST, e.g. 100-104 or 100,101,102"


def seed_list(text: str) -> tuple[int, ...]:
    """``--seeds``: integers >= 0 and inclusive ranges ``FIRST-LAST``, comma-separated, in the given
    order; a seed named twice, a backwards range or anything else is an ``ArgumentTypeError``."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\s*-\s*(\d+))?\s*", part)
        if match is None:
            raise argparse.ArgumentTypeError(f"expected {SEEDS_FORM}; got {text!r}")
        first = int(match.group(1))
        last = first if match.group(2) is None else int(match.group(2))
        if last < first:
            raise argparse.ArgumentTypeError(
                f"the range {part.strip()!r} runs backwards; expected FIRST-LAST"
            )
        for seed in range(first, last + 1):
            if seed in seeds:
                raise argparse.ArgumentTypeError(f"{text!r} names seed {seed} twice")
            seeds.append(seed)
    return tuple(seeds)


def _mixer(text: str) -> str:
    if text not in ROW_NAMES:
        raise argparse.ArgumentTypeError(f"unknown mixer {text!r}; choose from {', '.join(ROW_NAMES)}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ttt-mixer recall-gap``."""
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (created; rerun to resume); required"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="; ".join(f"{preset.name}: {preset.description}" for preset in PRESETS.values()),
    )
    sd = CPU.set_disjointness
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="mqar",
        help="the task every mixer is trained and evaluated on: mqar (the default) or set_disjointness "
        "(Arora et al. 2024's: two sets sharing one symbol, answer it; trained with the short set first "
        "and, separately, with the long set first, each evaluated in both orders, read once and twice "
        f"(ttt_set_disjointness, ttt_set_disjointness_twice); the cpu preset: L{sd.lengths[0]}, "
        f"{sd.steps} steps of {sd.batch_size}, {sd.eval_samples} documents per shape; --seq-len sets L, "
        "--kv-pairs does not apply)",
    )
    parser.add_argument(
        "--mixers",
        type=comma_list(_mixer),
        help=f"comma-separated subset of {','.join(ROW_NAMES)} (default: the preset's)",
    )
    parser.add_argument(
        "--widths",
        type=comma_list(positive_int),
        help="model widths (comma-separated) (default: the preset's)",
    )
    parser.add_argument("--layers", type=positive_int, help="number of layers (default: the preset's)")
    parser.add_argument("--heads", type=positive_int, help="heads of every mixer (default: the preset's)")
    parser.add_argument(
        "--seq-len",
        type=positive_int,
        help="training sequence length (symbols; set disjointness: of the two sets together) (default: the preset's)",
    )
    parser.add_argument(
        "--kv-pairs", type=positive_int, help="key-value pairs per training sequence (default: the preset's)"
    )
    parser.add_argument(
        "--steps", type=positive_int, help="training steps (the same for every mixer) (default: the preset's)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        help="sequences per step (over all devices) (default: the preset's)",
    )
    parser.add_argument(
        "--learning-rates",
        type=comma_list(_learning_rate),
        help="learning rates for every mixer; several: a sweep, the best kept per mixer (default: the preset's)",
    )
    parser.add_argument(
        "--length-factors",
        type=comma_list(positive_int),
        help="evaluation lengths, as multiples of --seq-len (default: the preset's)",
    )
    parser.add_argument(
        "--eval-samples",
        type=positive_int,
        help="MQAR sequences (set-disjointness documents) per evaluation shape (default: the preset's)",
    )
    parser.add_argument("--eval-batch-size", type=positive_int, default=64, help="lm-eval batch size")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed",
        type=non_negative_int,
        help="seed of the models and the training data; the same as --seeds with one seed (default: 0)",
    )
    seeds.add_argument(
        "--seeds",
        type=seed_list,
        help=f"train every run once per seed ({SEEDS_FORM}) and report per column the median and the "
        "range over the seeds, and per mixer in how many seeds it learned its training shape (default: "
        "none, one seed: --seed)",
    )
    parser.add_argument(
        "--save-steps",
        type=positive_int,
        help="checkpoint every this many steps (default: a fifth of --steps)",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        help="runs trained side by side in worker processes (CPU only; default: one per CPU core)",
    )
    parser.add_argument(
        "--min-attention-accuracy",
        type=float,
        help="fail when attention scores below this at its training shape (0 turns the check off) (default: the preset's)",
    )
    parser.add_argument(
        "--checkpoints",
        type=comma_list(str),
        help="evaluate these checkpoints (folders or hub names, comma-separated) instead of training (default: train)",
    )


def resolve_preset(args: argparse.Namespace) -> Preset:
    """The chosen preset for the chosen task with the command line's overrides; ValueError naming a
    bad option."""
    preset = PRESETS[args.preset].for_task(args.task)
    changes: dict[str, Any] = {}
    for option, name in (
        ("mixers", "mixers"),
        ("widths", "widths"),
        ("layers", "num_layers"),
        ("heads", "num_heads"),
        ("steps", "steps"),
        ("batch_size", "batch_size"),
        ("learning_rates", "learning_rates"),
        ("length_factors", "length_factors"),
        ("eval_samples", "eval_samples"),
        ("min_attention_accuracy", "min_attention_accuracy"),
    ):
        if getattr(args, option) is not None:
            changes[name] = getattr(args, option)
    recipe = preset.set_disjointness
    if args.task == "set_disjointness" and recipe is not None:  # (for_task refused a preset without one)
        if args.kv_pairs is not None:
            raise ValueError("--kv-pairs: set disjointness has no key-value pairs; give --seq-len alone")
        if args.seq_len is not None:
            try:
                changes["train_shapes"] = recipe.train_shapes((args.seq_len,))
            except ValueError as error:
                raise ValueError(f"--seq-len: {error}") from None
    elif args.seq_len is not None or args.kv_pairs is not None:
        if len(preset.train_shapes) > 1 and (args.seq_len is None or args.kv_pairs is None):
            raise ValueError(
                f"--seq-len and --kv-pairs: preset {preset.name} trains on several shapes; give both"
            )
        first = preset.train_shapes[0]
        try:
            shape = MQARShape(args.seq_len or first.seq_len, args.kv_pairs or first.num_kv_pairs)
        except ValueError as error:
            raise ValueError(f"--seq-len and --kv-pairs: {error}") from None
        changes["train_shapes"] = (shape,)
    for option in ("mixers", "widths", "learning_rates"):
        values = changes.get(option, ())
        if len(set(values)) != len(values):
            raise ValueError(
                f"--{option.replace('_', '-')} names a value twice: {','.join(map(str, values))}"
            )
    preset = dataclasses.replace(preset, **changes)
    bad = [w for w in preset.widths if w % preset.num_heads]
    if bad:
        raise ValueError(f"--widths {bad} are not multiples of --heads {preset.num_heads}")
    if not 0 <= preset.min_attention_accuracy <= 1:
        raise ValueError(f"--min-attention-accuracy must be in [0, 1], got {preset.min_attention_accuracy}")
    for shape in preset.train_shapes:
        try:
            preset.eval_shapes(shape)
        except ValueError as error:
            raise ValueError(f"--seq-len and --length-factors: {error}") from None
    return preset


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run; exits with an error message for bad
    options and with status 1 when the attention sanity check fails."""
    parser = argparse.ArgumentParser(prog="ttt-mixer recall-gap", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        run(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))


def run(args: argparse.Namespace) -> None:
    """The command on parsed arguments (``add_arguments``'s); ValueError for bad options."""
    from ttt_mixer.recall_gap.pipeline import recall_gap

    preset = resolve_preset(args)
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"--out {args.out} is a file, not a folder")
    checkpoints = args.checkpoints and tuple(checkpoint_source(c) for c in args.checkpoints)
    if checkpoints and args.seeds is not None:
        raise ValueError("--seeds trains each run per seed; --checkpoints trains nothing: give one of them")
    seeds = args.seeds or (0 if args.seed is None else args.seed,)
    recall_gap(preset, args.out, seeds, args.jobs, args.save_steps, args.eval_batch_size, checkpoints)
