"""The ``ttt-mixer`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ttt_mixer.adapters.cli import (
    add_distill_arguments,
    add_overwrite_argument,
    add_swap_arguments,
    distill_command,
    swap_command,
)
from ttt_mixer.adapters.distill import NonFiniteTrainingError
from ttt_mixer.arguments import non_negative_int, positive_int
from ttt_mixer.decode_timing import decode_ms_per_step
from ttt_mixer.models import TTTConfig, TTTForCausalLM
from ttt_mixer.paths import prepare_output_folder
from ttt_mixer.progress import plain_output_for_logs
from ttt_mixer.recall_gap import DESCRIPTION as RECALL_GAP_DESCRIPTION
from ttt_mixer.recall_gap import add_arguments as add_recall_gap_arguments

DEMO_TEXT = (
    "Test-time training makes the hidden state of a recurrent layer a small model, trained by "
    "gradient descent on a self-supervised loss while the sequence is read, mini-batch by mini-batch. "
)


def _train(
    model: TTTForCausalLM, data: torch.Tensor, steps: int, seq_len: int, generator: torch.Generator
) -> float | None:
    """Next-byte prediction on random windows of ``data``; returns the last loss (None for 0 steps)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = None
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq_len, (8,), generator=generator)
        batch = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return None if loss is None else loss.item()


def demo(args: argparse.Namespace) -> None:
    """Build a small byte-level TTT model, train it briefly on a built-in text, generate from it and
    print its decoding speed at two context lengths."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = TTTConfig(
        vocab_size=256,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        mini_batch_size=16,
        ttt_layer_type=args.ttt_layer_type,
        backbone=args.backbone,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = TTTForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"TTT-{args.ttt_layer_type} ({args.backbone} backbone): {params / 1e6:.2f} M parameters")
    data = torch.tensor(list((DEMO_TEXT * 20).encode()))
    start = time.perf_counter()
    loss = _train(model, data, args.train_steps, 128, generator)
    # 0 steps: an untrained model, which has no training loss to print
    print(
        f"trained {args.train_steps} steps of 8 x 128 bytes in {time.perf_counter() - start:.1f} s"
        + ("" if loss is None else f", loss {loss:.3f}")
    )
    prompt = torch.tensor([list(args.prompt.encode())])
    start = time.perf_counter()
    output = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    text = bytes(output[0, prompt.shape[1] :].tolist()).decode(errors="replace")
    print(
        f"generated {args.new_tokens} tokens in {seconds:.2f} s ({args.new_tokens / seconds:.0f} tokens/s):"
    )
    print(f"  {args.prompt}[{text}]")
    for context, ms in decode_ms_per_step(model, (128, 4096), 1, 32, generator).items():
        print(f"decode after {context:>4} tokens of context: {ms['median']:.2f} ms/token")


def convert(args: argparse.Namespace) -> None:
    """Convert the authors' checkpoint folder to a ttt-mixer Hugging Face checkpoint."""
    from ttt_mixer.convert import from_ttt_lm_pytorch, load_ttt_lm_pytorch_checkpoint

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
    p.set_defaults(func=tasks_path)
    # everything after "eval" is lm-eval's; main() hands it over before argparse could reject it
    p = commands.add_parser(
        "eval", help=evaluate.__doc__, add_help=False, usage="ttt-mixer eval [LM_EVAL_ARGUMENTS ...]"
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments of lm-eval's command line")
    p.set_defaults(func=evaluate)
    p = commands.add_parser("plot", help=plot.__doc__)
    p.add_argument("results", nargs="+", type=Path, help="lm-eval results JSON files (one per model)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs (created if missing)")
    p.set_defaults(func=plot)
    p = commands.add_parser("recall-gap", help=RECALL_GAP_DESCRIPTION, description=RECALL_GAP_DESCRIPTION)
    add_recall_gap_arguments(p)
    p.set_defaults(func=recall_gap)
    p = commands.add_parser("swap", help=swap_command.__doc__)
    add_swap_arguments(p)
    p.set_defaults(func=swap_command)
    p = commands.add_parser("distill", help=distill_command.__doc__)
    add_distill_arguments(p)
    p.set_defaults(func=distill_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # lm-eval's options would be unknown to argparse here
        args = argparse.Namespace(command="eval", func=evaluate, lm_eval_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    plain_output_for_logs()
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, NonFiniteTrainingError) as error:
        # bad input, as argparse reports it: one line naming the command, exit status 2
        print(f"ttt-mixer {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
