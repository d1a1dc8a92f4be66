"""``ttt-mixer to-e2e``: a saved Llama checkpoint made TTT-E2E (``from_llama``) and saved with its
tokenizer. ttt_mixer/cli.py imports this module only to run the command; its options are there
(read without importing the library)."""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AutoConfig, AutoModelForCausalLM

from ttt_mixer.e2e.from_llama import check_llama, from_llama
from ttt_mixer.paths import checkpoint_source, prepare_output_folder
from ttt_mixer.tokenizer import save_source_tokenizer


def local_checkpoint(name: str) -> Path:
    """The folder of ``name``: a checkpoint folder, or the snapshot of a Hub model id that is already
    in the local Hugging Face cache (nothing is downloaded)."""
    source = checkpoint_source(name)
    if Path(source).is_dir():
        return Path(source)
    try:
        return Path(snapshot_download(source, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{name}: neither a checkpoint folder nor a model in the local Hugging Face cache "
            "(to-e2e does not download: fetch it first, e.g. with `hf download`)"
        ) from None


def to_e2e_command(args: argparse.Namespace) -> None:
    """Make the Llama checkpoint ``args.source`` TTT-E2E with the options' settings and save it, with
    the source's tokenizer, in ``args.destination``. Everything that can be refused is checked from
    the source's config before the weights are read or the destination is touched."""
    source = local_checkpoint(args.source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{args.source} has no config.json: not a transformers checkpoint folder")
    config = AutoConfig.from_pretrained(source)
    check_llama(config)
    if args.suffix_len > config.num_hidden_layers:
        raise ValueError(
            f"--suffix-len must be at most the checkpoint's {config.num_hidden_layers} layers, "
            f"got {args.suffix_len}"
        )
    prepare_output_folder(args.destination, args.overwrite)
    model = from_llama(
        AutoModelForCausalLM.from_pretrained(source),
        suffix_len=args.suffix_len,
        mini_batch_size=args.mini_batch_size,
        sliding_window_size=args.sliding_window_size,
        inner_lr=args.inner_lr,
        inner_clip_gradient=args.inner_clip_gradient,
    )
    model.save_pretrained(args.destination)
    save_source_tokenizer(str(source), args.destination)
    print(
        f"TTT-E2E: {config.num_hidden_layers} blocks with a {args.sliding_window_size}-token window, the "
        f"last {args.suffix_len} with an inner MLP (an SGD step of rate {args.inner_lr} per "
        f"{args.mini_batch_size} tokens)\nwrote {args.destination}"
    )
