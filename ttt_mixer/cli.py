"""The ``ttt-mixer`` command line. Reading it imports no heavy dependency (no torch, transformers,
fla, lm-eval): each command imports what it needs when it runs (``ttt_mixer_cli``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ttt_mixer.arguments import (
    add_overwrite_argument,
    int_at_least,
    non_negative_int,
    positive_float,
    positive_int,
)
from ttt_mixer.recall_gap import DESCRIPTION as RECALL_GAP_DESCRIPTION
from ttt_mixer.recall_gap import add_arguments as add_recall_gap_arguments

# ttt_mixer.adapters' MIXER_NAMES and swap's INITS: importing the adapters to read them would take
# seconds; tests/test_cli.py checks that these stay the same
SWAP_MIXERS = (
    "ttt_linear",
    "ttt_mlp",
    "attention",
    "based",
    "mamba",
    "gla",
    "gated_deltanet",
    "longhorn",
    "mamba2",
    "titans",
    "lact",
)
SWAP_INITS = ("random", "attention")


def demo(args: argparse.Namespace) -> None:
    """Build a small byte-level TTT model, train it briefly on a built-in text, generate from it and
    print its decoding speed at two context lengths."""
    from ttt_mixer.demo import run

    run(args)


def convert(args: argparse.Namespace) -> None:
    """Convert the authors' checkpoint folder to a ttt-mixer Hugging Face checkpoint."""
    from ttt_mixer.convert import from_ttt_lm_pytorch, load_ttt_lm_pytorch_checkpoint
    from ttt_mixer.paths import prepare_output_folder

    if not args.source.is_dir():
        raise FileNotFoundError(f"{args.source}: no such folder (their checkpoint folder)")
    prepare_output_folder(args.destination, args.overwrite)
    state_dict, config = load_ttt_lm_pytorch_checkpoint(args.source)
    model = from_ttt_lm_pytorch(state_dict, config)
    model.save_pretrained(args.destination)
    print(f"wrote {args.destination}")


def tasks_path(args: argparse.Namespace) -> None:
    """Print the folder of ttt-mixer's lm-eval task configs, for ``lm_eval --include_path``."""
    from ttt_mixer.eval_tasks import tasks_path as eval_tasks_path

    print(eval_tasks_path())


def evaluate(args: argparse.Namespace) -> None:
    """Run lm-eval's command line (all arguments pass through) with ttt_mixer imported, so TTT
    checkpoints load without trust_remote_code, and ttt-mixer's tasks included."""
    from ttt_mixer.evaluation import main as evaluation_main

    evaluation_main(args.lm_eval_args)


def plot(args: argparse.Namespace) -> None:
    """Plot recall vs context length and perplexity vs position from lm-eval results JSONs, one
    PNG per (task, metric), one line per results file."""
    from ttt_mixer.plotting import plot_results

    for path in plot_results(args.results, args.out):
        print(path)


def recall_gap(args: argparse.Namespace) -> None:
    """The main job (ttt_mixer.recall_gap)."""
    from ttt_mixer.recall_gap import run

    run(args)


def add_swap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="checkpoint folder (Llama, full-attention Mistral or Qwen2, Mamba, Mamba-2, or a swapped model)",
    )
    parser.add_argument("destination", type=Path, help="folder for the swapped checkpoint")
    parser.add_argument("--mixer", choices=SWAP_MIXERS, required=True)
    parser.add_argument("--layers", default="all", help="'all', 'every:k' or indices such as 0,2,5")
    parser.add_argument("--init", choices=SWAP_INITS, default="random")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="mixer option")
    add_overwrite_argument(parser)


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("teacher", help="the original checkpoint folder")
    parser.add_argument("student", help="the swapped checkpoint folder (ttt-mixer swap); needs a tokenizer")
    parser.add_argument("destination", type=Path, help="folder for the distilled checkpoint")
    parser.add_argument("--text", type=Path, required=True, help="UTF-8 text file to distil on")
    parser.add_argument("--seq-len", type=int_at_least(2), default=256)
    parser.add_argument("--layerwise-steps", type=non_negative_int, default=200)
    parser.add_argument("--finetune-steps", type=non_negative_int, default=0)
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    add_overwrite_argument(parser)


def swap(args: argparse.Namespace) -> None:
    """Swap the mixer of some or all layers of a saved checkpoint and save the result."""
    from ttt_mixer.adapters.cli import swap_command

    swap_command(args)


def distill(args: argparse.Namespace) -> None:
    """Distil a swapped checkpoint from its original (layer-wise, then optionally end to end); print
    the perplexity on the text's last tenth (held out) before and after."""
    from ttt_mixer.adapters.cli import distill_command

    distill_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttt-mixer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help=demo.__doc__)
    p.add_argument("--ttt-layer-type", choices=("linear", "mlp"), default="linear")
    p.add_argument("--backbone", choices=("transformer", "mamba"), default="mamba")
    p.add_argument("--hidden-size", type=positive_int, default=128)
    p.add_argument("--heads", type=positive_int, default=2)
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--prompt", default="Test-time training makes the hidden state")
    p.add_argument("--train-steps", type=non_negative_int, default=150)
    p.add_argument("--new-tokens", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    p = commands.add_parser("convert", help=convert.__doc__)
    p.add_argument(
        "source",
        type=Path,
        help="folder with the authors' config.json and model.safetensors or pytorch_model.bin",
    )
    p.add_argument(
        "destination",
        type=Path,
        help="output folder (Hugging Face format, loads with trust_remote_code=True)",
    )
    add_overwrite_argument(p)
    p.set_defaults(func=convert)
    p = commands.add_parser("tasks-path", help=tasks_path.__doc__)
    p.set_defaults(func=tasks_path, needs_library=False)
    # everything after "eval" is lm-eval's; main() hands it over before argparse could reject it
    p = commands.add_parser(
        "eval", help=evaluate.__doc__, add_help=False, usage="ttt-mixer eval [LM_EVAL_ARGUMENTS ...]"
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments of lm-eval's command line")
    p.set_defaults(func=evaluate)
    p = commands.add_parser("plot", help=plot.__doc__)
    p.add_argument("results", nargs="+", type=Path, help="lm-eval results JSON files (one per model)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs (created if missing)")
    p.set_defaults(func=plot, needs_library=False)
    p = commands.add_parser("recall-gap", help=RECALL_GAP_DESCRIPTION, description=RECALL_GAP_DESCRIPTION)
    add_recall_gap_arguments(p)
    p.set_defaults(func=recall_gap)
    p = commands.add_parser("swap", help=swap.__doc__)
    add_swap_arguments(p)
    p.set_defaults(func=swap)
    p = commands.add_parser("distill", help=distill.__doc__)
    add_distill_arguments(p)
    p.set_defaults(func=distill)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # lm-eval's options would be unknown to argparse here
        args = argparse.Namespace(command="eval", func=evaluate, lm_eval_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    reported: tuple[type[Exception], ...] = (ValueError, TypeError, OSError)
    if getattr(args, "needs_library", True):
        # fla's import keeps transformers' model types only as ttt_mixer's own import does it
        import ttt_mixer

        ttt_mixer.import_library()
        from ttt_mixer.adapters.distill import NonFiniteTrainingError
        from ttt_mixer.progress import plain_output_for_logs

        reported += (NonFiniteTrainingError,)
        plain_output_for_logs()  # (it imports transformers and datasets)
    try:
        args.func(args)
    except reported as error:
        # bad input, as argparse reports it: one line naming the command, exit status 2
        print(f"ttt-mixer {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
