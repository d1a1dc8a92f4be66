"""``ttt-mixer swap`` and ``ttt-mixer distill``: the adapters on saved checkpoints. ttt_mixer/cli.py
imports this module only to run these two commands; their options are in ttt_mixer/cli.py (read
without importing the adapters)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from ttt_mixer.adapters.distill import check_precision, distill, perplexity
from ttt_mixer.adapters.swap import swap_mixer
from ttt_mixer.paths import checkpoint_source, prepare_output_folder
from ttt_mixer.tokenizer import require_tokenizer, save_source_tokenizer


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON (numbers, true/false) or else kept as strings."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _load(path: str) -> Any:
    # the checkpoint may be a ttt-mixer class (auto_map) or a plain transformers one
    return AutoModelForCausalLM.from_pretrained(checkpoint_source(path), trust_remote_code=True)


def _save(model: Any, source: str, destination: Path) -> None:
    # the destination was checked before any work (prepare_output_folder)
    model.save_pretrained(destination)
    save_source_tokenizer(source, destination)
    print(f"wrote {destination}")


def swap_command(args: argparse.Namespace) -> None:
    """Swap the mixer of some or all layers of a saved checkpoint and save the result."""
    layers = args.layers
    if layers not in ("all",) and not layers.startswith("every:"):
        try:
            layers = [int(i) for i in layers.split(",")]
        except ValueError:
            raise ValueError(
                f"--layers takes 'all', 'every:k' or indices like 0,2,5; got {args.layers!r}"
            ) from None
    options = parse_options(args.option)
    source = checkpoint_source(args.source)
    prepare_output_folder(args.destination, args.overwrite)
    model = swap_mixer(_load(source), args.mixer, layers, args.init, **options)
    print(f"mixers: {model.config.mixers}")
    _save(model, source, args.destination)


def text_windows(tokenizer: Any, path: Path, seq_len: int) -> torch.Tensor:
    """The text's tokens cut into [num_windows, seq_len] (the last partial window is dropped)."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    count = len(ids) // seq_len
    if count < 2:
        raise ValueError(f"--text holds {len(ids)} tokens: fewer than two windows of --seq-len {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


def distill_command(args: argparse.Namespace) -> None:
    """Distil a swapped checkpoint from its original (layer-wise, then optionally end to end); print
    the perplexity on the text's last tenth (held out) before and after. Under ``torchrun`` or
    ``accelerate launch`` every process trains its share of each batch; the first one evaluates and
    saves."""
    torch.manual_seed(args.seed)
    check_precision(args.gradient_checkpointing, args.bf16)
    if not args.text.is_file():
        raise FileNotFoundError(f"--text {args.text}: no such file")
    teacher_source, student_source = checkpoint_source(args.teacher), checkpoint_source(args.student)
    require_tokenizer(student_source, "the student")  # one line with the fix, before any loading
    # every process checks the folder (nothing is written before the end) and measures "before": the
    # processes learn their ranks when the Trainer sets them up
    prepare_output_folder(args.destination, args.overwrite)
    teacher, student = _load(teacher_source), _load(student_source)
    windows = text_windows(AutoTokenizer.from_pretrained(student_source), args.text, args.seq_len)
    held_out = max(1, len(windows) // 10)
    train, test = windows[:-held_out], windows[-held_out:]
    before = perplexity(student, test)
    distill(
        student,
        teacher,
        train,
        args.layerwise_steps,
        args.finetune_steps,
        args.lr,
        args.batch_size,
        args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
    )
    if PartialState().is_main_process:
        print(
            f"held-out perplexity: teacher {perplexity(teacher, test):.3f}, "
            f"student before {before:.3f}, after {perplexity(student, test):.3f}"
        )
        _save(student, student_source, args.destination)
    PartialState().wait_for_everyone()
