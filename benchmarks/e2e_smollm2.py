"""SmolLM2-135M made TTT-E2E (``ttt_mixer.e2e.from_llama``) and meta-trained briefly on *Botchan*
on the CPU: held-out perplexity at a context longer than the sliding window, before and after.

Rows: SmolLM2 itself (full attention); the swapped model with its inner loop off (``inner_lr=0``:
sliding-window attention only); the swapped model learning at test time before any outer step; and
after ``--steps`` meta-learning steps (AdamW on every weight, the outer loss differentiated through
the inner steps) on windows of the book's first nine tenths; with ``--ilr-warmup-steps`` the inner
rate warms up from ``--ilr-init`` over the first steps, as the authors meta-train
(``ttt_mixer.e2e.warmup``). The held-out text is its last tenth, read in ``--eval-len``-token
sequences; the perplexity is also given for the tokens past the window.

    python benchmarks/e2e_smollm2.py                      # 20 steps of 1 x 256 tokens, eval at 1024
    python benchmarks/e2e_smollm2.py --steps 5 --eval-sequences 1
    python benchmarks/e2e_smollm2.py --ilr-warmup-steps 5   # the inner rate warmed up from 0.01
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from ttt_mixer.e2e.from_llama import from_llama
from ttt_mixer.e2e.warmup import check_warmup, warmed_up_inner_lr
from ttt_mixer.real_model import botchan_text, smollm2_checkpoint


def perplexities(model: torch.nn.Module, sequences: list[torch.Tensor], past: int) -> tuple[float, float]:
    """(perplexity over every predicted token, over those at positions >= ``past``)."""
    total, count, late, late_count = 0.0, 0, 0.0, 0
    for ids in sequences:
        with torch.no_grad():
            logits = model(ids[None]).logits[0, :-1].float()
        nll = F.cross_entropy(logits, ids[1:], reduction="none")
        total, count = total + nll.sum().item(), count + nll.numel()
        late, late_count = late + nll[past:].sum().item(), late_count + nll[past:].numel()
    return math.exp(total / count), math.exp(late / late_count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suffix-len", type=int, default=6, help="inner-MLP blocks of the 30")
    parser.add_argument("--mini-batch-size", type=int, default=64)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument(
        "--ilr-init",
        type=float,
        default=0.01,
        help="the inner rate at the warm-up's start (their ilr_init: a tenth of their inner rate 1)",
    )
    parser.add_argument(
        "--ilr-warmup-steps", type=int, default=0, help="meta-learning steps of the warm-up (0: none)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-len", type=int, default=1024)
    parser.add_argument("--eval-sequences", type=int, default=2)
    args = parser.parse_args()
    check_warmup(args.ilr_init, args.ilr_warmup_steps)
    torch.manual_seed(0)
    folder = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llama = AutoModelForCausalLM.from_pretrained(folder).eval()
    text = botchan_text()
    cut = text.index("\n", int(len(text) * 0.9))
    train_ids = tokenizer(text[:cut], return_tensors="pt").input_ids[0]
    held_out = tokenizer(text[cut + 1 :], return_tensors="pt").input_ids[0]
    sequences = [held_out[i * args.eval_len : (i + 1) * args.eval_len] for i in range(args.eval_sequences)]
    swap = {
        "suffix_len": args.suffix_len,
        "mini_batch_size": args.mini_batch_size,
        "sliding_window_size": args.window,
    }
    rows = []

    def evaluate(name: str, model: torch.nn.Module) -> None:
        start = time.perf_counter()
        rows.append((name, *perplexities(model, sequences, args.window), time.perf_counter() - start))
        print(
            f"{name}: {rows[-1][1]:.2f} (past the window {rows[-1][2]:.2f}), {rows[-1][3]:.0f} s", flush=True
        )

    evaluate("SmolLM2 (full attention)", llama)
    evaluate("TTT-E2E, inner loop off (inner_lr=0)", from_llama(llama, inner_lr=0.0, **swap))
    model = from_llama(llama, inner_lr=args.inner_lr, **swap)
    evaluate(f"TTT-E2E, inner_lr={args.inner_lr}, before training", model)
    del llama
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(args.steps):
        at = int(torch.randint(0, len(train_ids) - args.train_len, ()))
        ids = train_ids[at : at + args.train_len][None]
        model.config.inner_lr = warmed_up_inner_lr(step, args.inner_lr, args.ilr_init, args.ilr_warmup_steps)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}: loss {loss.item():.3f}, inner lr {model.config.inner_lr:.3g}", flush=True)
    model.config.inner_lr = args.inner_lr  # the trained model runs at the full rate
    step_seconds = (time.perf_counter() - start) / max(args.steps, 1)
    model.eval()
    evaluate(f"TTT-E2E, after {args.steps} meta-learning steps", model)
    print(f"\n{vars(args)}; {step_seconds:.1f} s per meta-learning step, torch {torch.__version__}")
    print("| model | held-out perplexity | past the window | eval seconds |\n| --- | --- | --- | --- |")
    for name, ppl, late, seconds in rows:
        print(f"| {name} | {ppl:.2f} | {late:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
