"""Distillation throughput: today's ``distill`` against the hand-written loop it replaced, in one run.

The teacher is SmolLM2-135M-Instruct (``ttt_mixer.real_model``: the GGUF file scripts/setup.sh
installs; ``--random`` or its absence: a random Llama at SmolLM2's exact config); the student swaps
every second of its 30 layers to TTT-Linear with ``init="attention"`` (mini-batch 16), the setting of
issue 26. Both run the layer-wise stage for ``--steps`` steps of ``--batch-size`` x ``--seq-len``
random tokens on the same fresh student; tokens per second count every step's tokens over the whole
call, start-up included (the Trainer's set-up and its DataLoader worker's first batch count against
the new code). The old loop is the file at commit BASELINE as git holds it (``git show``), loaded as
a module: no copy of it lives here. Runs alternate old/new ``--repeats`` times so that the load of a
shared machine hits both alike; the medians and their ratio are printed.

    python benchmarks/bench_distill.py                 # 8 steps of 4 x 256 tokens, 2 repeats
    python benchmarks/bench_distill.py --steps 4 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from ttt_mixer.adapters import swap_mixer
from ttt_mixer.adapters.distill import distill

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "257f76d"  # the last commit of the hand-written loop (adapters/distill.py)


def baseline_module() -> types.ModuleType:
    """adapters/distill.py as of BASELINE, read from git and run as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{BASELINE}:adapters/distill.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("distill_baseline")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{BASELINE}:adapters/distill.py", "exec"), module.__dict__)
    return module


def teacher_model(random: bool) -> tuple[torch.nn.Module, str]:
    try:
        from ttt_mixer.real_model import smollm2_checkpoint

        folder = smollm2_checkpoint()
    except FileNotFoundError:
        if not random:
            print(
                "the real-model fixture is not installed: a random model at SmolLM2's config", file=sys.stderr
            )
        random = True
    if random:
        # SmolLM2-135M's config as transformers reads it from the GGUF file, without the file
        config = AutoConfig.for_model(
            "llama",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval(), "random Llama at SmolLM2-135M's config"
    return AutoModelForCausalLM.from_pretrained(folder).eval(), "SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--random", action="store_true", help="a random model at SmolLM2's config")
    args = parser.parse_args()

    teacher, name = teacher_model(args.random)
    vocab = teacher.config.vocab_size
    ids = torch.randint(
        0, vocab, (max(64, args.batch_size), args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    old = baseline_module()
    tokens = args.steps * args.batch_size * args.seq_len

    def student() -> torch.nn.Module:
        torch.manual_seed(1)
        return swap_mixer(teacher, "ttt_linear", "every:2", init="attention", mini_batch_size=16)

    runs = {
        f"hand-written loop ({BASELINE})": lambda s: old.distill(
            s, teacher, ids, args.steps, 0, 1e-3, args.batch_size, progress=False
        ),
        "Trainer (this commit)": lambda s: distill(
            s, teacher, ids, args.steps, 0, 1e-3, args.batch_size, progress=False
        ),
    }
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    print(
        f"{name}, every second layer TTT-Linear; {args.steps} layer-wise steps of {args.batch_size} x "
        f"{args.seq_len} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average before {os.getloadavg()[0]:.2f}"
    )
    for repeat in range(args.repeats):
        for label, run in runs.items():
            model = student()
            start = time.perf_counter()
            run(model)
            seconds[label].append(time.perf_counter() - start)
            print(f"  repeat {repeat + 1}: {label}: {seconds[label][-1]:.1f} s", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}\n")
    print("| code | seconds (median) | tokens/s |")
    print("| --- | --- | --- |")
    rates = {}
    for label, values in seconds.items():
        rates[label] = tokens / statistics.median(values)
        print(f"| {label} | {statistics.median(values):.1f} | {rates[label]:.0f} |")
    old_rate, new_rate = rates.values()
    print(f"\nratio (new / old tokens/s): {new_rate / old_rate:.2f}")


if __name__ == "__main__":
    main()
