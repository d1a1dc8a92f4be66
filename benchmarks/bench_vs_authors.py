"""Benchmark ttt_mixer against the authors' PyTorch implementation (ttt-lm-pytorch) on CPU.

Both ``TTTModel``s get the same config (Transformer backbone) and the same weights: the authors' random
weights are copied into ours with ``ttt_mixer.convert.from_ttt_lm_pytorch``, and the script checks that
both compute the same function before it times anything. It measures, in one process, float32 on CPU:

1. inference forward (``torch.no_grad``) of the whole TTTModel on [batch, seq_len] random ids;
2. forward + backward (``last_hidden_state.sum().backward()``);
3. the CPU time of 2-D matrix products (projections, SwiGLU) inside our 1. and 2.: both models compute
   them alike, so their total divided by it bounds what any TTT implementation can gain;
4. the first TTT layer alone (projections, TTT, post-norm, output projection), 1. and 2.;
5. decode time per step of our TTTForCausalLM with the cache at 128 and at 4096 tokens of context.

Timings are medians over ``--repeats`` after warm-up runs; ours and theirs alternate within every repeat
so that machine noise hits both alike. The authors' ttt.py is never part of this project: pass its
path with ``--authors-ttt`` (see benchmarks/README.md).

    python benchmarks/bench_vs_authors.py --authors-ttt /path/to/ttt.py --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from transformers.utils import ModelOutput

import ttt_mixer
from ttt_mixer.convert import config_from_ttt_lm_pytorch, from_ttt_lm_pytorch
from ttt_mixer.decode_timing import decode_ms_per_step
from ttt_mixer.models import TTTForCausalLM
from ttt_mixer.models.causal_lm import CACHE_FIELD

AUTHORS_URL = "https://raw.githubusercontent.com/test-time-training/ttt-lm-pytorch/main/ttt.py"
HOW_TO_GET_AUTHORS = (
    "The authors' implementation is the single file ttt.py of github.com/test-time-training/ttt-lm-pytorch.\n"
    f"Download it anywhere outside this repository, e.g.\n    curl -L -o /tmp/ttt.py {AUTHORS_URL}\n"
    "and pass --authors-ttt /tmp/ttt.py"
)
MAX_ABS_DIFF = 1e-3
DECODE_CONTEXTS = (128, 4096)
# speed targets, checked and reported (never fail the process)
TARGET_FWD_BWD = 2.0  # forward + backward speed-up over theirs (aim: 3x)
AIM_FWD_BWD = 3.0
TARGET_INFERENCE = 3.0  # inference forward speed-up over theirs
TARGET_DECODE_RATIO = 1.25  # decode time per step at 4096 context / at 128
# transformers 5.2x renamed the ModelOutput field past_key_values / cache_params to cache (the old names
# stay accepted as keywords and attributes, with a deprecation warning); 5.6 still has the old fields.
# Detected by feature (CACHE_FIELD), not by version string.
CACHE_RENAMED = CACHE_FIELD == "cache"


@dataclass
class Row:
    ttt_layer_type: str
    measurement: str
    ours_ms: float
    theirs_ms: float | None = None
    ratio: float | None = None  # theirs / ours for comparisons; 4096 / 128 for the decode ratio
    note: str = ""
    ours_min_ms: float | None = None  # fastest repeat (JSON only): less sensitive to a busy machine
    theirs_min_ms: float | None = None
    is_bound: bool = False  # ratio is an upper bound on theirs/ours, not a measured speed-up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors-ttt", type=Path, default=None, help="path to the authors' ttt.py")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=512, help="SwiGLU width (same for both)")
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--ttt-layer-type", choices=("linear", "mlp", "both"), default="both")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--decode-steps", type=int, default=32, help="single-token steps timed per decode run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_authors_module(path: Path) -> ModuleType:
    """Import their ttt.py from ``path`` (under its own module name, never from the repository)."""
    spec = importlib.util.spec_from_file_location("authors_ttt", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    # dataclasses in their file look their module up in sys.modules
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    # Accommodations for newer transformers are made here, in this script, never in ttt_mixer.
    if CACHE_RENAMED:
        rename_cache_params_fields(module)
    return module


def rename_cache_params_fields(module: ModuleType) -> None:
    """Give their output dataclasses (TTTOutput, TTTCausalLMOutput) a ``cache`` field in place of
    ``cache_params``.

    Since the transformers 5.2x rename, ``ModelOutput.__init__`` turns the keyword ``cache_params`` into
    ``cache``, so their ``TTTOutput(cache_params=...)``, whose field is still ``cache_params``, raises
    TypeError. Each class is rebuilt with the same fields in the same order, that one renamed; their
    code finds it through its module global, and ``out.cache_params`` / ``out.get("cache_params")``
    still reach the field, which ModelOutput maps to ``cache``. (Their TTTForCausalLM.generate would
    need more, but the benchmark only runs their TTTModel and its layers.)"""
    for name, cls in list(vars(module).items()):
        if not (isinstance(cls, type) and issubclass(cls, ModelOutput) and cls.__module__ == module.__name__):
            continue
        old = fields(cls)
        if "cache_params" not in {f.name for f in old}:
            continue
        new = [
            ("cache" if f.name == "cache_params" else f.name, f.type, field(default=f.default)) for f in old
        ]
        namespace = {"__module__": module.__name__, "__doc__": cls.__doc__}
        setattr(module, name, make_dataclass(name, new, bases=(ModelOutput,), namespace=namespace))


def config_dict(args: argparse.Namespace, layer_type: str) -> dict:
    """Their TTTConfig fields; the same dict configures both models (Transformer backbone)."""
    return {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "mini_batch_size": args.mini_batch,
        "ttt_layer_type": layer_type,
        # their default for both inner models; ours would pick 0.1 for mlp if left unset
        "ttt_base_lr": 1.0,
        "pre_conv": False,
        "share_qk": False,
        "use_gate": False,
        "tie_word_embeddings": True,
        # their RoPE positions are t mod mini_batch_size, so this bounds nothing; large enough for decode
        "max_position_embeddings": max(args.seq_len, *DECODE_CONTEXTS) + args.decode_steps,
    }


def build_models(
    args: argparse.Namespace, layer_type: str, authors: ModuleType | None
) -> tuple[TTTForCausalLM, nn.Module | None]:
    """Our TTTForCausalLM (float32, eval) and, when their file is given, their TTTModel with the same
    weights (ours is converted from theirs)."""
    cfg = config_dict(args, layer_type)
    torch.manual_seed(args.seed)
    if authors is None:
        return TTTForCausalLM(config_from_ttt_lm_pytorch(cfg)).float().eval(), None
    theirs = authors.TTTModel(authors.TTTConfig(**cfg)).float().eval()
    ours = from_ttt_lm_pytorch(theirs.state_dict(), cfg).float().eval()
    return ours, theirs


def check_agreement(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        a = ours(ids, use_cache=False).last_hidden_state
        b = theirs(ids, use_cache=False).last_hidden_state
    diff = (a - b).abs().max().item()
    if not diff <= MAX_ABS_DIFF:
        raise AssertionError(f"ours and theirs disagree: max abs diff {diff:.3e} > {MAX_ABS_DIFF}")
    return diff


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def compare(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    between: Callable[[], None] | None = None,
) -> dict[str, tuple[float, float]]:
    """(median, min) ms of each function; all of them run once per repeat, their order alternating."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            if between is not None:
                between()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(timed(fns[name]))
            if between is not None:
                between()
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def inference_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(ids, use_cache=False).last_hidden_state

    return run


def fwd_bwd_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def run() -> None:
        model(ids, use_cache=False).last_hidden_state.sum().backward()

    return run


def layer_fns(
    ours: nn.Module, theirs: nn.Module | None, hidden: torch.Tensor
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
    """Inference and forward+backward callables of the first TTT layer alone (projections, TTT,
    post-norm, output projection; no SwiGLU, norms or embeddings): the mixers compared without the
    matrix products the two models share around them."""
    positions = torch.arange(hidden.shape[1])[None, :]
    calls = {"ours": lambda: ours(hidden)[0]}
    if theirs is not None:
        calls["theirs"] = lambda: theirs(hidden, position_ids=positions)

    def inference(call: Callable[[], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return call()

        return run

    def fwd_bwd(call: Callable[[], torch.Tensor]) -> Callable[[], object]:
        return lambda: call().sum().backward()

    return {k: inference(c) for k, c in calls.items()}, {k: fwd_bwd(c) for k, c in calls.items()}


def matrix_product_ms(
    fn: Callable[[], object], repeats: int, between: Callable[[], None] | None = None
) -> float:
    """Median over ``repeats`` calls of the CPU time ``fn`` spends in 2-D matrix products (aten::mm and
    aten::addmm): the projections and the SwiGLU, which both models compute alike (the TTT inner
    loops use batched products, aten::bmm / baddbmm). Their time divided by this bounds the speed-up
    of any TTT implementation inside the same model."""
    times = []
    for _ in range(repeats):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        events = prof.key_averages()
        times.append(sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm")) / 1e3)
        if between is not None:
            between()
    return statistics.median(times)


def floor_row(layer_type: str, measurement: str, floor_ms: float, compared: Row) -> Row:
    bound = None if compared.theirs_ms is None else compared.theirs_ms / floor_ms
    return Row(
        layer_type,
        measurement,
        floor_ms,
        ratio=bound,
        note="ours only; theirs ÷ this bounds the speed-up",
        is_bound=True,
    )


def bench_layer_type(
    args: argparse.Namespace, layer_type: str, authors: ModuleType | None
) -> tuple[list[Row], float | None]:
    lm, theirs = build_models(args, layer_type, authors)
    ours = lm.model
    ids = torch.randint(
        0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(args.seed)
    )
    diff = None
    if theirs is not None:
        diff = check_agreement(ours, theirs, ids)
        print(
            f"[{layer_type}] max abs diff of last hidden states, ours vs theirs: {diff:.3e} (<= {MAX_ABS_DIFF})"
        )
    models = {"ours": ours} if theirs is None else {"ours": ours, "theirs": theirs}
    rows = []

    print(f"[{layer_type}] timing inference forward ...", flush=True)
    t = compare({k: inference_fn(m, ids) for k, m in models.items()}, args.repeats, args.warmup)
    rows.append(comparison_row(layer_type, "inference forward", t))

    def clear_grads() -> None:
        for m in models.values():
            m.zero_grad(set_to_none=True)

    print(f"[{layer_type}] timing forward+backward ...", flush=True)
    t = compare({k: fwd_bwd_fn(m, ids) for k, m in models.items()}, args.repeats, args.warmup, clear_grads)
    rows.append(comparison_row(layer_type, "forward+backward", t))
    clear_grads()

    print(f"[{layer_type}] timing the shared matrix products ...", flush=True)
    inference_row, fwd_bwd_row = rows[-2:]
    floor = matrix_product_ms(inference_fn(ours, ids), args.repeats)
    rows.append(floor_row(layer_type, "matrix products of inference", floor, inference_row))
    floor = matrix_product_ms(fwd_bwd_fn(ours, ids), args.repeats, clear_grads)
    rows.append(floor_row(layer_type, "matrix products of fwd+bwd", floor, fwd_bwd_row))
    clear_grads()

    print(f"[{layer_type}] timing the TTT layer alone ...", flush=True)
    hidden = torch.randn(
        args.batch, args.seq_len, args.hidden, generator=torch.Generator().manual_seed(args.seed)
    )
    their_layer = None if theirs is None else theirs.layers[0].seq_modeling_block
    layer_inference, layer_fwd_bwd = layer_fns(ours.layers[0].attn, their_layer, hidden)
    rows.append(
        comparison_row(
            layer_type, "TTT layer inference forward", compare(layer_inference, args.repeats, args.warmup)
        )
    )
    t = compare(layer_fwd_bwd, args.repeats, args.warmup, clear_grads)
    rows.append(comparison_row(layer_type, "TTT layer forward+backward", t))
    clear_grads()

    print(f"[{layer_type}] timing decode ...", flush=True)
    decode = decode_ms_per_step(
        lm,
        DECODE_CONTEXTS,
        args.batch,
        args.decode_steps,
        torch.Generator().manual_seed(args.seed + 1),
        repeats=args.repeats,
        warmup=args.warmup,
    )
    short, long = DECODE_CONTEXTS
    for c in DECODE_CONTEXTS:
        rows.append(
            Row(
                layer_type,
                f"decode ms/step @ {c} ctx",
                decode[c]["median"],
                note=f"ours only; median step (mean {decode[c]['mean']:.2f})",
            )
        )
    rows.append(
        Row(
            layer_type,
            f"decode {long}/{short} ratio",
            decode[long]["median"],
            ratio=decode[long]["median"] / decode[short]["median"],
            note=f"median step @ {long} ÷ @ {short}",
        )
    )
    return rows, diff


def comparison_row(layer_type: str, measurement: str, t: dict[str, tuple[float, float]]) -> Row:
    ours, ours_min = t["ours"]
    theirs, theirs_min = t.get("theirs", (None, None))
    return Row(
        layer_type,
        measurement,
        ours,
        theirs,
        None if theirs is None else theirs / ours,
        "theirs/ours (medians)",
        ours_min,
        theirs_min,
    )


def check_targets(rows: list[Row]) -> list[dict]:
    checks = []
    for row in rows:
        if row.ratio is None:
            continue
        if row.measurement == "forward+backward":
            target, ok = f">= {TARGET_FWD_BWD:g}x faster (aim {AIM_FWD_BWD:g}x)", row.ratio >= TARGET_FWD_BWD
        elif row.measurement == "inference forward":
            target, ok = f">= {TARGET_INFERENCE:g}x faster", row.ratio >= TARGET_INFERENCE
        elif row.measurement.endswith("ratio"):
            target, ok = f"<= {TARGET_DECODE_RATIO:g}", row.ratio <= TARGET_DECODE_RATIO
        else:
            continue
        checks.append(
            {
                "ttt_layer_type": row.ttt_layer_type,
                "measurement": row.measurement,
                "value": row.ratio,
                "target": target,
                "pass": ok,
            }
        )
    return checks


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| ttt_layer_type | measurement | ours ms | theirs ms | ratio | |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.ratio is None:
            ratio = "—"
        elif r.is_bound:
            ratio = f"≤ {r.ratio:.2f}x"
        else:
            ratio = f"{r.ratio:.2f}x" if r.theirs_ms is not None else f"{r.ratio:.3f}"
        lines.append(
            f"| {r.ttt_layer_type} | {r.measurement} | {fmt(r.ours_ms)} | {fmt(r.theirs_ms)} | {ratio} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)

    authors = None
    if args.authors_ttt is None:
        print(f"NOTE: no --authors-ttt given, timing ours only (no comparison rows).\n{HOW_TO_GET_AUTHORS}\n")
    elif not args.authors_ttt.is_file():
        print(
            f"error: --authors-ttt {args.authors_ttt} is not a file.\n{HOW_TO_GET_AUTHORS}", file=sys.stderr
        )
        return 2
    else:
        authors = load_authors_module(args.authors_ttt)

    layer_types = ["linear", "mlp"] if args.ttt_layer_type == "both" else [args.ttt_layer_type]
    meta = {
        "torch": torch.__version__,
        "ttt_mixer": ttt_mixer.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "authors_ttt": None if args.authors_ttt is None else str(args.authors_ttt),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "hidden": args.hidden,
        "heads": args.heads,
        "layers": args.layers,
        "mini_batch": args.mini_batch,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "decode_steps": args.decode_steps,
        "dtype": "float32",
    }
    print("# ttt_mixer vs authors' ttt-lm-pytorch (CPU, float32)")
    print(f"torch {meta['torch']} | threads {meta['threads']} | CPU: {meta['cpu']}")
    print(
        f"batch {args.batch} x seq_len {args.seq_len} | hidden {args.hidden}, heads {args.heads}, "
        f"layers {args.layers}, mini-batch {args.mini_batch}, intermediate {args.intermediate}, "
        f"vocab {args.vocab} | median of {args.repeats} (warm-up {args.warmup})\n",
        flush=True,
    )

    rows: list[Row] = []
    diffs: dict[str, float | None] = {}
    for layer_type in layer_types:
        layer_rows, diffs[layer_type] = bench_layer_type(args, layer_type, authors)
        rows.extend(layer_rows)
    checks = check_targets(rows)

    print()
    print(markdown_table(rows))
    print(
        "\nmax abs diff (last hidden state): "
        + ", ".join(f"{k} {'—' if v is None else f'{v:.2e}'}" for k, v in diffs.items())
    )
    print("\nTargets:")
    for c in checks:
        status = "PASS" if c["pass"] else "FAIL"
        print(
            f"  {status}  {c['ttt_layer_type']:6s} {c['measurement']:22s} {c['value']:.2f} (target {c['target']})"
        )

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"meta": meta, "max_abs_diff": diffs, "rows": [asdict(r) for r in rows], "targets": checks}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
