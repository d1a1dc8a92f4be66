"""The ``ttt-mixer`` command line. Reading it imports no heavy dependency (no torch, transformers,
fla, lm-eval): each command imports what it needs when it runs (``ttt_mixer_cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ttt_mixer.adapters.mixers.registry import INITS, MIXER_NAMES, attention_start_mixers, mixer_help
from ttt_mixer.arguments import (
    HelpFormatter,
    add_overwrite_argument,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from ttt_mixer.recall_gap import DESCRIPTION as RECALL_GAP_DESCRIPTION
from ttt_mixer.recall_gap import add_arguments as add_recall_gap_arguments

DESCRIPTION = (
    "Test-Time-Training sequence mixers (TTT-Linear, TTT-MLP) as Hugging Face models: train a demo, "
    "swap mixers into Llama or Mamba checkpoints and distil them, evaluate with lm-eval, and run the "
    "recall-gap experiment. Each command has its own --help."
)
DEMO_DESCRIPTION = (
    "Build a small byte-level TTT language model, train it briefly (--train-steps) on a built-in paragraph, "
    "generate a continuation of --prompt greedily (printed as the prompt followed by [the generated "
    "bytes]) and print its decoding speed after 128 and 4096 tokens of context, which is flat: a TTT "
    "layer's state does not grow with the context. With --save, the model and its byte-level tokenizer "
    "are saved as a checkpoint that the other commands read."
)
EVAL_EPILOG = """ttt-mixer eval runs lm-eval's command line (above) with ttt_mixer imported, so ttt-mixer checkpoints
load with --model hf --model_args pretrained=FOLDER, and with ttt-mixer's task folder included
(ttt-mixer tasks-path), so these tasks need no --include_path:

  ttt_recall_synthetic (group): ttt_mqar and ttt_mqar_twice (acc@L, exact_match@L), ttt_phonebook
      and ttt_passkey (exact_match@L), ttt_set_disjointness and ttt_set_disjointness_twice (acc@L,
      exact_match@L), one metric per context length L
  ttt_recall_data (group): ttt_swde, ttt_fda, ttt_squad_completion and their _twice variants
      (contains); hub datasets, or local files with recall_data_files
  ttt_ppl (group): ttt_ppl_rolling (word_perplexity, byte_perplexity, bits_per_byte) and
      ttt_ppl_position (ppl@a-b per token-position bucket, ppl); PG19's test split, or local files
      with ppl_files
  ttt_recall: ttt_recall_synthetic and ttt_recall_data

Their options go in --metadata as JSON, e.g. --metadata '{"context_lengths": [512, 1024]}':

  seed (1234), num_samples (50): documents per length
  context_lengths ([1024, 2048, 4096]): phonebook and passkey lengths, in the model's tokens; each
      must fit the model's max_length (--model_args max_length=...)
  mqar_seq_lengths ([64, 128, 256]), mqar_num_kv_pairs (8), mqar_power_a (0.01): MQAR's lengths (in
      symbols), key-value pairs and query-gap law
  passkey_digits (5), passkey_depths ([0.0, 0.25, 0.5, 0.75, 1.0])
  sd_lengths ([16, 32, 64]), sd_first_fraction (0.25): set disjointness's symbols in both sets and
      the first set's share of them
  ppl_files (none: the dataset below): a glob or a list of text files, one document each
  ppl_dataset ("emozilla/pg19-test"), ppl_dataset_split ("test"), ppl_text_column ("text")
  ppl_bucket_edges ([0, 512, 1024, 2048, 4096, 8192, 16384, 32768]), ppl_max_tokens (32768): tokens
  recall_data_files ({}): local files for the recall-data tasks, e.g. {"swde": "swde.jsonl"}
  tokenizer: the tokenizer that sizes prompts when the model is not a path (default: pretrained)

A checkpoint needs a tokenizer: ttt-mixer demo --save and the README's examples save one.
"""


def demo(args: argparse.Namespace) -> None:
    """Build a small byte-level TTT model, train it briefly on a built-in text, generate from it and
    print its decoding speed at two context lengths."""
    from ttt_mixer.demo import run

    run(args)


def convert(args: argparse.Namespace) -> None:
    """Convert the authors' checkpoint folder to a ttt-mixer Hugging Face checkpoint."""
    from ttt_mixer.paths import prepare_output_folder

    if not args.source.is_dir():
        raise FileNotFoundError(f"{args.source}: no such folder (their checkpoint folder)")
    if args.settings and args.source_code != "ttt-e2e":
        raise ValueError(
            "--set applies to --from ttt-e2e only (ttt-lm-pytorch checkpoints hold their config)"
        )
    if args.source_code == "ttt-e2e":
        from ttt_mixer.e2e.convert import load_e2e_checkpoint, model_weights_folder

        model_weights_folder(args.source)  # a missing checkpoint fails before the output folder is touched
        prepare_output_folder(args.destination, args.overwrite)
        model = load_e2e_checkpoint(args.source, **dict(args.settings))
    else:
        from ttt_mixer.convert import from_ttt_lm_pytorch, load_ttt_lm_pytorch_checkpoint

        prepare_output_folder(args.destination, args.overwrite)
        state_dict, config = load_ttt_lm_pytorch_checkpoint(args.source)
        model = from_ttt_lm_pytorch(state_dict, config)
    model.save_pretrained(args.destination)
    print(f"wrote {args.destination}")


def config_setting(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` as (field, value), the value read as JSON (numbers, true/false, null) or else
    kept as a string."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def tasks_path(args: argparse.Namespace) -> None:
    """Print the folder of ttt-mixer's lm-eval task configs, for ``lm_eval --include_path``."""
    from ttt_mixer.eval_tasks import tasks_path as eval_tasks_path

    print(eval_tasks_path())


def _model_args(lm_eval_args: list[str]) -> dict[str, str]:
    """The key=value pairs of lm-eval's --model_args (the last one given)."""
    text = ""
    for i, arg in enumerate(lm_eval_args):
        if arg == "--model_args" and i + 1 < len(lm_eval_args):
            text = lm_eval_args[i + 1]
        elif arg.startswith("--model_args="):
            text = arg.partition("=")[2]
    pairs = (pair.partition("=") for pair in text.split(",") if pair.strip())
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


def _causal_backend_for_ours(lm_eval_args: list[str], model_args: dict[str, str]) -> list[str]:
    """lm-eval's arguments with backend=causal added to --model_args when the checkpoint is one of
    ours: lm-eval's HFLM picks causal or seq2seq from transformers' own model types and warns about
    any other type (the user gave no backend, and every ttt-mixer model is causal)."""
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = Path(model_args.get("pretrained", ""), "config.json")
    if "backend" in model_args or not config.is_file():
        return lm_eval_args
    saved = json.loads(config.read_text())
    if saved.get("model_type") in CONFIG_MAPPING_NAMES or "auto_map" not in saved:
        return lm_eval_args  # transformers' own type (lm-eval knows it) or another library's
    args = list(lm_eval_args)
    for i, arg in enumerate(args):
        if arg == "--model_args":
            args[i + 1] += ",backend=causal"
        elif arg.startswith("--model_args="):
            args[i] += ",backend=causal"
    return args


def evaluate(args: argparse.Namespace) -> None:
    """Run lm-eval's command line (all arguments pass through) with ttt_mixer imported, so TTT
    checkpoints load without trust_remote_code, and ttt-mixer's tasks included."""
    from ttt_mixer.evaluation import main as evaluation_main

    if args.needs_library:
        from ttt_mixer.tokenizer import require_tokenizer

        model_args = _model_args(args.lm_eval_args)
        if "pretrained" in model_args and "tokenizer" not in model_args:
            require_tokenizer(model_args["pretrained"], "the checkpoint of --model_args pretrained")
        evaluation_main(_causal_backend_for_ours(args.lm_eval_args, model_args))
        return
    try:
        evaluation_main(args.lm_eval_args)
    except SystemExit as exit:  # argparse's, after printing lm-eval's help
        if exit.code not in (0, None):
            raise
    print("\nttt-mixer's tasks:\n" + EVAL_EPILOG)


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


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("teacher", help="the original checkpoint folder")
    parser.add_argument("student", help="the swapped checkpoint folder (ttt-mixer swap); needs a tokenizer")
    parser.add_argument(
        "destination", type=Path, help="folder for the distilled checkpoint and its tokenizer"
    )
    parser.add_argument("--text", type=Path, required=True, help="UTF-8 text file to distil on; required")
    parser.add_argument(
        "--seq-len", type=int_at_least(2), default=256, help="tokens per training window of the text"
    )
    parser.add_argument(
        "--layerwise-steps",
        type=non_negative_int,
        default=200,
        help="steps training each swapped layer to reproduce its original layer's output",
    )
    parser.add_argument(
        "--finetune-steps",
        type=non_negative_int,
        default=0,
        help="steps training the swapped mixers end to end on the text's next-token loss afterwards",
    )
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the window order and of torch")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, about a third more compute)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 mixed precision (a CUDA GPU that supports it)"
    )
    add_overwrite_argument(parser)


def add_swap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="checkpoint folder or Hub model id (Llama, full-attention Mistral or Qwen2, Mamba, Mamba-2, or a "
        "swapped model)",
    )
    parser.add_argument(
        "destination", type=Path, help="folder for the swapped checkpoint and the source's tokenizer"
    )
    parser.add_argument(
        "--mixer",
        choices=MIXER_NAMES,
        required=True,
        metavar="MIXER",
        help="the mixer put in place of the swapped layers' own (required): " + mixer_help(),
    )
    parser.add_argument(
        "--layers", default="all", help="the layers to swap: 'all', 'every:k' or indices such as 0,2,5"
    )
    parser.add_argument(
        "--init",
        choices=INITS,
        default="random",
        help="random: the new mixers start from their own initialisation; attention: they start from "
        f"the attention they replace (Llama backbones; mixers {', '.join(attention_start_mixers())})",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the mixer's constructor, e.g. num_heads=4 (repeat for several; default: none)",
    )
    add_overwrite_argument(parser)


def swap(args: argparse.Namespace) -> None:
    """Swap the mixer of some or all layers of a saved checkpoint and save the result."""
    from ttt_mixer.adapters.cli import swap_command

    swap_command(args)


def add_to_e2e_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="Llama checkpoint folder (the real-model fixture's: python -m ttt_mixer.real_model prints it), "
        "or a Hub model id already in the local Hugging Face cache (nothing is downloaded); Qwen2 is "
        "refused (its q, k, v biases have no place in TTT-E2E)",
    )
    parser.add_argument(
        "destination", type=Path, help="folder for the TTT-E2E checkpoint and the source's tokenizer"
    )
    parser.add_argument(
        "--sliding-window-size",
        type=positive_int,
        default=8192,
        help="tokens each attention reads, itself included (the authors' released models: 8192)",
    )
    parser.add_argument(
        "--suffix-len",
        type=non_negative_int,
        default=3,
        help="last blocks that get an inner MLP trained at test time, at most the checkpoint's layers "
        "(0: sliding-window attention only; the authors' 125M model: 3)",
    )
    parser.add_argument(
        "--mini-batch-size",
        type=positive_int,
        default=1024,
        help="tokens per inner SGD step (the authors' released models: 1024)",
    )
    parser.add_argument(
        "--inner-lr",
        type=non_negative_float,
        default=1.0,
        help="the inner SGD step's rate (0: no inner step)",
    )
    parser.add_argument(
        "--inner-clip-gradient",
        type=non_negative_float,
        default=1.0,
        help="global norm the inner gradient is clipped to (0: no clipping)",
    )
    add_overwrite_argument(parser)


def to_e2e(args: argparse.Namespace) -> None:
    """Make a saved Llama checkpoint TTT-E2E and save it with its tokenizer."""
    from ttt_mixer.e2e.cli import to_e2e_command

    to_e2e_command(args)


def distill(args: argparse.Namespace) -> None:
    """Distil a swapped checkpoint from its original (layer-wise, then optionally end to end); print
    the perplexity on the text's last tenth (held out) before and after."""
    from ttt_mixer.adapters.cli import distill_command

    distill_command(args)


def build_parser() -> argparse.ArgumentParser:
    """The command line. ``swap``'s options come from the mixer registry, which imports nothing heavy."""
    parser = argparse.ArgumentParser(prog="ttt-mixer", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def subcommand(name: str, help: str, **kwargs: object) -> argparse.ArgumentParser:
        kwargs.setdefault("description", help)
        return commands.add_parser(name, help=help, formatter_class=HelpFormatter, **kwargs)

    p = subcommand(
        "demo",
        "train a small byte-level TTT model briefly, generate from it and time its decoding",
        description=DEMO_DESCRIPTION,
    )
    p.add_argument(
        "--ttt-layer-type",
        choices=("linear", "mlp"),
        default="linear",
        help="the TTT layer's inner model: linear (TTT-Linear) or a two-layer MLP (TTT-MLP)",
    )
    p.add_argument(
        "--backbone",
        choices=("transformer", "mamba"),
        default="mamba",
        help="the block around each TTT layer: transformer (TTT, then a SwiGLU MLP) or mamba (a causal "
        "convolution before TTT, queries and keys from one projection, a gated output: the TTT paper's "
        "Mamba backbone)",
    )
    p.add_argument("--hidden-size", type=positive_int, default=128, help="model width")
    p.add_argument("--heads", type=positive_int, default=2, help="TTT heads (must divide --hidden-size)")
    p.add_argument("--layers", type=positive_int, default=2, help="number of layers")
    p.add_argument(
        "--prompt", default="Test-time training makes the hidden state", help="text the generation continues"
    )
    p.add_argument(
        "--train-steps",
        type=non_negative_int,
        default=150,
        help="AdamW steps of 8 random 128-byte windows of the built-in text (0: untrained)",
    )
    p.add_argument("--new-tokens", type=positive_int, default=64, help="bytes to generate")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the training windows")
    p.add_argument(
        "--save",
        type=Path,
        help="folder to save the trained model and its byte-level tokenizer in (default: not saved)",
    )
    add_overwrite_argument(p)
    p.set_defaults(func=demo)
    p = subcommand(
        "convert",
        "convert the TTT authors' checkpoint folder (ttt-lm-pytorch, or TTT-E2E's JAX code) to a ttt-mixer checkpoint",
    )
    p.add_argument(
        "source",
        type=Path,
        help="ttt-lm-pytorch: folder with the authors' config.json and model.safetensors or pytorch_model.bin; "
        "ttt-e2e: their experiment folder (latest step), a step folder or its model_weights",
    )
    p.add_argument(
        "--from",
        dest="source_code",
        choices=("ttt-lm-pytorch", "ttt-e2e"),
        default="ttt-lm-pytorch",
        help="the code that saved SOURCE (default ttt-lm-pytorch); ttt-e2e needs orbax-checkpoint",
    )
    p.add_argument(
        "--set",
        dest="settings",
        type=config_setting,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="ttt-e2e: an E2EConfig field the arrays do not hold (default: their released checkpoints' "
        "mini_batch_size=1024, sliding_window_size=8192, rope_theta=500000, ...); repeatable",
    )
    p.add_argument("destination", type=Path, help="output folder (Hugging Face format)")
    add_overwrite_argument(p)
    p.set_defaults(func=convert)
    p = subcommand("tasks-path", "print the folder of ttt-mixer's lm-eval tasks, for lm_eval --include_path")
    p.set_defaults(func=tasks_path, needs_library=False)
    # everything after "eval" is lm-eval's; main() hands it over before argparse could reject it
    p = subcommand(
        "eval",
        "lm-eval's command line, with ttt_mixer imported and its tasks included (see ttt-mixer eval --help)",
        add_help=False,
        usage="ttt-mixer eval [LM_EVAL_ARGUMENTS ...]",
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments of lm-eval's command line")
    p.set_defaults(func=evaluate)
    p = subcommand(
        "plot",
        "plot recall against context length and perplexity against position from lm-eval results JSONs",
        description="One PNG per (task, metric) that is scored per context length or position bucket, "
        "one line per results file (one model each).",
    )
    p.add_argument(
        "results",
        nargs="+",
        type=Path,
        help="lm-eval results JSON files (one per model; lm-eval writes OUTPUT/MODEL/results_*.json)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="folder for the PNGs (created if missing); required"
    )
    p.set_defaults(func=plot, needs_library=False)
    p = subcommand(
        "recall-gap",
        "train mixers on MQAR and report their recall at the training length and beyond it",
        description=RECALL_GAP_DESCRIPTION,
    )
    add_recall_gap_arguments(p)
    p.set_defaults(func=recall_gap)
    p = subcommand("swap", "swap the mixer of some or all layers of a saved checkpoint and save the result")
    add_swap_arguments(p)
    p.set_defaults(func=swap)
    p = subcommand(
        "distill",
        "distil a swapped checkpoint from its original (layer by layer, then optionally end to end)",
        description="Distil a swapped checkpoint from its original: each swapped layer learns to reproduce "
        "the original layer's output, then optionally the whole student the teacher's next-token "
        "distribution. Prints the perplexity on the text's last tenth (held out) before and after.",
    )
    add_distill_arguments(p)
    p.set_defaults(func=distill)
    p = subcommand(
        "to-e2e",
        "make a saved Llama checkpoint TTT-E2E: sliding-window attention, an inner MLP in its last blocks",
        description="Make a saved Llama checkpoint TTT-E2E (end-to-end test-time training): every block's "
        "attention reads a sliding window, and each of the last --suffix-len blocks gets a second MLP, "
        "trained at test time by one SGD step per --mini-batch-size tokens on the next-token loss. The "
        "inner MLPs start as their block's MLP with a zero output, so before its first inner step the "
        "model computes what the Llama computes within the window; meta-learning then trains it "
        "(benchmarks/e2e_smollm2.py). Loads with trust_remote_code=True, or after import ttt_mixer.e2e.",
    )
    add_to_e2e_arguments(p)
    p.set_defaults(func=to_e2e)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # lm-eval's options would be unknown to argparse here
        # lm-eval's help, and ours after it, need no model: the library is not imported for it
        help_only = not argv[1:] or any(arg in ("-h", "--help") for arg in argv[1:])
        args = argparse.Namespace(
            command="eval", func=evaluate, lm_eval_args=argv[1:], needs_library=not help_only
        )
    else:
        args = build_parser().parse_args(argv)
    reported: tuple[type[Exception], ...] = (ValueError, TypeError, OSError)
    if getattr(args, "needs_library", True):
        # the library and the adapters' backbones registered with transformers' Auto classes, as
        # importing ttt_mixer.adapters does outside the launcher (checkpoints of swapped models load)
        import ttt_mixer.adapters

        ttt_mixer.adapters.import_adapters()
        from ttt_mixer.progress import plain_output_for_logs
        from ttt_mixer.training import NonFiniteTrainingError

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
