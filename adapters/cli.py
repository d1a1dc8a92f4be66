"""``ttt-mixer swap`` and ``ttt-mixer distill``: the adapters on saved checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from ttt_mixer.adapters.distill import distill, perplexity
from ttt_mixer.adapters.mixers import MIXER_NAMES
from ttt_mixer.adapters.swap import INITS, swap_mixer


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON (numbers, true/false) or else kept as strings."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option takes key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _load(path: str) -> Any:
    # the checkpoint may be a ttt-mixer class (auto_map) or a plain transformers one
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


def _save(model: Any, source: str, destination: Path) -> None:
    model.save_pretrained(destination)
    if Path(source, "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(source).save_pretrained(destination)
    print(f"wrote {destination}")


def add_swap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="checkpoint folder (Llama, full-attention Mistral or Qwen2, Mamba, or a swapped model)"
    )
    parser.add_argument("destination", type=Path, help="folder for the swapped checkpoint")
    parser.add_argument("--mixer", choices=MIXER_NAMES, required=True)
    parser.add_argument("--layers", default="all", help="'all', 'every:k' or indices such as 0,2,5")
    parser.add_argument("--init", choices=INITS, default="random")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="mixer option")


def swap_command(args: argparse.Namespace) -> None:
    """Swap the mixer of some or all layers of a saved checkpoint and save the result."""
    layers = args.layers
    if layers not in ("all",) and not layers.startswith("every:"):
        try:
            layers = [int(i) for i in layers.split(",")]
        except ValueError:
            raise SystemExit(
                f"--layers takes 'all', 'every:k' or indices like 0,2,5; got {args.layers!r}"
            ) from None
    try:
        model = swap_mixer(_load(args.source), args.mixer, layers, args.init, **parse_options(args.option))
    except (TypeError, ValueError) as error:
        raise SystemExit(f"ttt-mixer swap: {error}") from None
    print(f"mixers: {model.config.mixers}")
    _save(model, args.source, args.destination)


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("teacher", help="the original checkpoint folder")
    parser.add_argument("student", help="the swapped checkpoint folder (ttt-mixer swap); needs a tokenizer")
    parser.add_argument("destination", type=Path, help="folder for the distilled checkpoint")
    parser.add_argument("--text", type=Path, required=True, help="UTF-8 text file to distil on")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layerwise-steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def text_windows(tokenizer: Any, path: Path, seq_len: int) -> torch.Tensor:
    """The text's tokens cut into [num_windows, seq_len] (the last partial window is dropped)."""
    if seq_len < 2:
        raise SystemExit(f"--seq-len must be >= 2, got {seq_len}")
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    count = len(ids) // seq_len
    if count < 2:
        raise SystemExit(f"--text holds {len(ids)} tokens: fewer than two windows of --seq-len {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


def distill_command(args: argparse.Namespace) -> None:
    """Distil a swapped checkpoint from its original (layer-wise, then optionally end to end); print
    the perplexity on the text's last tenth (held out) before and after."""
    torch.manual_seed(args.seed)
    teacher, student = _load(args.teacher), _load(args.student)
    windows = text_windows(AutoTokenizer.from_pretrained(args.student), args.text, args.seq_len)
    held_out = max(1, len(windows) // 10)
    train, test = windows[:-held_out], windows[-held_out:]
    before = perplexity(student, test)
    try:
        distill(
            student,
            teacher,
            train,
            args.layerwise_steps,
            args.finetune_steps,
            args.lr,
            args.batch_size,
            args.seed,
        )
    except ValueError as error:
        raise SystemExit(f"ttt-mixer distill: {error}") from None
    print(
        f"held-out perplexity: teacher {perplexity(teacher, test):.3f}, "
        f"student before {before:.3f}, after {perplexity(student, test):.3f}"
    )
    _save(student, args.student, args.destination)
