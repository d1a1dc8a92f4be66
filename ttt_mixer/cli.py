"""The ``ttt-mixer`` command line."""

from __future__ import annotations

import argparse
import time

import torch

from ttt_mixer.models import TTTConfig, TTTForCausalLM


def _decode_ms_per_token(
    model: TTTForCausalLM, context: int, steps: int, generator: torch.Generator
) -> float:
    """Prefill ``context`` random bytes, then time ``steps`` single-token steps through the cache."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    return 1000 * (time.perf_counter() - start) / steps


def demo(args: argparse.Namespace) -> None:
    """Build a tiny byte-level TTT model, generate from it and print its speed."""
    torch.manual_seed(args.seed)
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
    model = TTTForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"TTT-{args.ttt_layer_type} ({args.backbone} backbone): {params / 1e6:.2f} M parameters, untrained")
    prompt = torch.tensor([list(args.prompt.encode())])
    start = time.perf_counter()
    output = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    text = bytes(output[0, prompt.shape[1] :].tolist()).decode(errors="replace")
    print(
        f"generated {args.new_tokens} tokens in {seconds:.2f} s ({args.new_tokens / seconds:.0f} tokens/s): {text!r}"
    )
    generator = torch.Generator().manual_seed(args.seed)
    for context in (128, 4096):
        ms = _decode_ms_per_token(model, context, 32, generator)
        print(f"decode after {context:>4} tokens of context: {ms:.2f} ms/token")


def convert(args: argparse.Namespace) -> None:
    """Convert the authors' checkpoint folder to a ttt-mixer Hugging Face checkpoint."""
    from ttt_mixer.convert import from_ttt_lm_pytorch, load_ttt_lm_pytorch_checkpoint

    state_dict, config = load_ttt_lm_pytorch_checkpoint(args.source)
    model = from_ttt_lm_pytorch(state_dict, config)
    model.save_pretrained(args.destination)
    print(f"wrote {args.destination}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttt-mixer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help=demo.__doc__)
    p.add_argument("--ttt-layer-type", choices=("linear", "mlp"), default="linear")
    p.add_argument("--backbone", choices=("transformer", "mamba"), default="mamba")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", default="Test-time training turns the hidden state into a model. ")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    p = commands.add_parser("convert", help=convert.__doc__)
    p.add_argument(
        "source", help="folder with the authors' config.json and model.safetensors or pytorch_model.bin"
    )
    p.add_argument(
        "destination", help="output folder (Hugging Face format, loads with trust_remote_code=True)"
    )
    p.set_defaults(func=convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
