"""TTT-E2E training step time on the CPU: a meta-learning step (forward through the inner loop,
backward through its steps) against a plain training step of the same Transformer without the
inner loop (``suffix_len=0``: the same sliding-window blocks, no inner MLPs), and against the same
model with its inner MLPs held fixed (``inner_lr=0``: the suffix still runs mini-batch by
mini-batch, no inner gradient is taken).
Medians over ``--repeats`` steps after one warm-up step; each step is forward, loss, backward.

    python benchmarks/bench_e2e.py                       # width 128, 4 layers (2 suffix), 4 x 512 tokens, mini-batch 64
    python benchmarks/bench_e2e.py --seq-len 256 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ttt_mixer.e2e import E2EConfig, E2EForCausalLM


def step_seconds(model: E2EForCausalLM, tokens: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(tokens, labels=tokens).loss.backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--suffix-len", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--mini-batch-size", type=int, default=64)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = {
        "vocab_size": 512,
        "hidden_size": args.hidden_size,
        "intermediate_size": 2 * args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden_size // 64),
        "mini_batch_size": args.mini_batch_size,
        "sliding_window_size": args.window,
        "bos_token_id": None,
    }
    torch.manual_seed(0)
    tokens = torch.randint(0, sizes["vocab_size"], (args.batch_size, args.seq_len))
    results = {}
    for name, overrides in (
        ("meta-learning step", {"suffix_len": args.suffix_len}),
        ("inner MLPs fixed (inner_lr=0)", {"suffix_len": args.suffix_len, "inner_lr": 0.0}),
        ("plain step (suffix_len=0)", {"suffix_len": 0}),
    ):
        torch.manual_seed(0)
        model = E2EForCausalLM(E2EConfig(**sizes, **overrides)).train()
        results[name] = step_seconds(model, tokens, args.repeats)
    plain = results["plain step (suffix_len=0)"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {vars(args)}")
    for name, seconds in results.items():
        print(f"{name:32s} {seconds:8.3f} s  ({seconds / plain:5.2f}x plain)")


if __name__ == "__main__":
    main()
