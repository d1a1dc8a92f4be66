"""``ttt-mixer demo``: a small byte-level TTT model, trained briefly on a built-in text, generating and
timing its decoding."""

from __future__ import annotations

import argparse
import time

import torch

from ttt_mixer.decode_timing import decode_ms_per_step
from ttt_mixer.models import TTTConfig, TTTForCausalLM
from ttt_mixer.paths import prepare_output_folder
from ttt_mixer.tokenizer import byte_tokenizer

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


def run(args: argparse.Namespace) -> None:
    """Build a small byte-level TTT model, train it briefly on a built-in text, generate from it and
    print its decoding speed at two context lengths; with ``args.save``, save it with its tokenizer."""
    if args.save is not None:
        prepare_output_folder(args.save, args.overwrite)
    tokenizer = byte_tokenizer()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = TTTConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        mini_batch_size=16,
        ttt_layer_type=args.ttt_layer_type,
        backbone=args.backbone,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = TTTForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"TTT-{args.ttt_layer_type} ({args.backbone} backbone): {params / 1e6:.2f} M parameters")
    data = tokenizer(DEMO_TEXT * 20, return_tensors="pt").input_ids[0]
    start = time.perf_counter()
    loss = _train(model, data, args.train_steps, 128, generator)
    # 0 steps: an untrained model, which has no training loss to print
    print(
        f"trained {args.train_steps} steps of 8 x 128 bytes in {time.perf_counter() - start:.1f} s"
        + ("" if loss is None else f", loss {loss:.3f}")
    )
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids
    start = time.perf_counter()
    output = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = output[0, prompt.shape[1] :]
    print(
        f"generated {len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.0f} tokens/s); "
        "the prompt, then [the greedy continuation, one token per byte]:"
    )
    print(f"  {args.prompt}[{tokenizer.decode(new)}]")
    for context, ms in decode_ms_per_step(model, (128, 4096), 1, 32, generator).items():
        print(f"decode after {context:>4} tokens of context: {ms['median']:.2f} ms/token")
    if args.save is not None:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        print(f"wrote {args.save} (the model and its byte-level tokenizer)")
