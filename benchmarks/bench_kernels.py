"""GPU benchmark of the TTT kernels against fla's kernels and flash attention (issue 15, item 5).

Rows (each timed at every sequence length T, with a fixed number of tokens per batch, so B = tokens / T):

- ours, Triton: TTT-Linear and TTT-MLP forward (``ttt_chunk_triton`` without gradients), forward +
  backward, and the decode step (``ttt_step_triton``, one token for each of ``--decode-batch``
  sequences whose state has read T tokens);
- ours, PyTorch: ``ttt_chunk`` forward + backward (the path the Triton kernels replace);
- fla: ``chunk_ttt_linear`` and ``fused_chunk_ttt_linear`` (TTT-Linear with different math: per-token
  learning rate, ``o + LN(o)``, 1/sqrt(d) scale; same shapes), ``chunk_gla`` and
  ``chunk_gated_delta_rule``, forward and forward + backward;
- ``scaled_dot_product_attention`` with the flash backend, causal, forward and forward + backward.

Columns: milliseconds (median of CUDA-event timings) and achieved TFLOP/s, from the FLOP counts of
``FLOPS_PER_TOKEN`` (matrix products only; forward + backward counts 3x the forward). Writes
``kernels.md`` and ``kernels.json`` under ``--out`` with the device, the versions, the table and the
issue's targets checked against it. A row that fails (an op missing from the installed fla, out of
memory) is recorded with its error and the run goes on.

    python benchmarks/bench_kernels.py --out gpu_check_out            # on a GPU (see gpu_check.sh)
    python benchmarks/bench_kernels.py --out /tmp/plan --dry-run      # the plan, without a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
ATTENTION_CHUNK = 64  # the chunk size the FLOP estimates of fla's GLA and gated delta rule assume


@dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...]
    tokens: int  # tokens per batch: B = tokens / T
    heads: int
    head_dim: int
    mini_batch: int
    dtype: str
    decode_batch: int
    warmup: int
    repeats: int
    slow_repeats: int  # for the PyTorch path, whose runs take seconds at long T
    rows: tuple[str, ...]


@dataclass
class Row:
    """One op and mode: milliseconds and TFLOP/s per sequence length (None where it failed)."""

    name: str
    mode: str  # "forward", "forward+backward" or "decode step"
    ms: dict[int, float | None] = field(default_factory=dict)
    tflops: dict[int, float | None] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


# FLOPs per token per head of each op's forward, matrix products only (b: TTT mini-batch, C: chunk)
def _ttt_linear_flops(d: int, b: int) -> float:
    # K W, Q W, K^T (lr g): 3 of 2 d^2; Q K^T and scores @ g: 2 of 2 b d
    return 6 * d * d + 4 * b * d


def _ttt_mlp_flops(d: int, b: int) -> float:
    # six [*, d] x [d, 4d]-sized products and the updates of both layers; scores over d and 4d
    return 48 * d * d + 20 * b * d


def _chunked_linear_attention_flops(d: int) -> float:
    # state update k^T v and read-out q S (2 of 2 d^2) and the intra-chunk scores (2 of 2 C d)
    return 4 * d * d + 4 * ATTENTION_CHUNK * d


def _attention_flops(d: int, seq_len: int) -> float:
    # causal: half of Q K^T and P V, 2 of 2 T d
    return 2 * seq_len * d


FLOPS_PER_TOKEN: dict[str, Callable[[int, int, int], float]] = {
    "ttt-linear": lambda d, b, T: _ttt_linear_flops(d, b),
    "ttt-mlp": lambda d, b, T: _ttt_mlp_flops(d, b),
    "fla-ttt-linear": lambda d, b, T: _ttt_linear_flops(d, 16),
    "fla-gla": lambda d, b, T: _chunked_linear_attention_flops(d),
    "fla-gated-delta-rule": lambda d, b, T: _chunked_linear_attention_flops(d) + 2 * ATTENTION_CHUNK * d,
    "attention": lambda d, b, T: _attention_flops(d, T),
}


# What is timed ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """A benchmarked op: ``run(inputs)`` returns the output to back-propagate from; ``make_inputs(B, T)``
    builds its leaf tensors (requires_grad set by the caller)."""

    name: str
    flops: str  # key of FLOPS_PER_TOKEN
    make_inputs: Callable[[int, int], dict[str, torch.Tensor]]
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    slow: bool = False


def _randn(*shape: int, settings: Settings, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, device="cuda")).to(DTYPES[settings.dtype])


def _zeros(*shape: int, settings: Settings) -> torch.Tensor:
    return torch.zeros(*shape, device="cuda", dtype=DTYPES[settings.dtype])


def _ttt_inputs(inner_model: str, settings: Settings) -> Callable[[int, int], dict[str, torch.Tensor]]:
    from ttt_mixer.ops import param_shapes, ttt_spec

    H, d, b = settings.heads, settings.head_dim, settings.mini_batch

    def make(B: int, T: int) -> dict[str, torch.Tensor]:
        inputs = {name: _randn(B, T, H, d, settings=settings) for name in ("q", "k", "v")}
        inputs["lr"] = (torch.sigmoid(torch.randn(B, T, H, device="cuda")) / d).to(DTYPES[settings.dtype])
        inputs["token_offset"] = _zeros(b, settings=settings)
        inputs["ln_weight"] = _zeros(H, d, settings=settings) + 1
        inputs["ln_bias"] = _zeros(H, d, settings=settings)
        shapes = param_shapes(ttt_spec(inner_model, b), H, d)
        for layer, (w_shape, b_shape) in enumerate(zip(shapes[::2], shapes[1::2], strict=True), start=1):
            inputs[f"w{layer}"] = _randn(*w_shape, settings=settings, scale=0.02)
            inputs[f"b{layer}"] = _zeros(*b_shape, settings=settings)
        return inputs

    return make


def _ttt_args(inner_model: str, x: dict[str, torch.Tensor]) -> tuple:
    params = [x[name] for name in ("w1", "b1", "w2", "b2") if name in x]
    names = ("q", "k", "v", "lr", "token_offset", "ln_weight", "ln_bias")
    return (inner_model, *(x[name] for name in names), params)


def _fla_inputs(kind: str, settings: Settings) -> Callable[[int, int], dict[str, torch.Tensor]]:
    """q, k, v [B, T, H, d] and what the op of ``kind`` ("ttt", "gla", "gated-delta-rule", "attention")
    takes besides."""
    H, d = settings.heads, settings.head_dim

    def make(B: int, T: int) -> dict[str, torch.Tensor]:
        inputs = {name: _randn(B, T, H, d, settings=settings) for name in ("q", "k", "v")}
        if kind == "ttt":
            inputs["ln_weight"] = _zeros(H, d, settings=settings) + 1
            inputs["ln_bias"] = _zeros(H, d, settings=settings)
            inputs["eta"] = (torch.sigmoid(torch.randn(B, T, H, 1, device="cuda")) / d).to(
                DTYPES[settings.dtype]
            )
        elif kind == "gla":
            # log-space forget gates in (-inf, 0)
            inputs["g"] = F.logsigmoid(torch.randn(B, T, H, d, device="cuda") + 4).to(DTYPES[settings.dtype])
        elif kind == "gated-delta-rule":
            inputs["g"] = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 4).float()
            inputs["beta"] = torch.sigmoid(torch.randn(B, T, H, device="cuda")).to(DTYPES[settings.dtype])
        return inputs

    return make


def _attention(x: dict[str, torch.Tensor]) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x[name].transpose(1, 2) for name in ("q", "k", "v"))  # [B, H, T, d]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def make_ops(settings: Settings) -> list[Op]:
    """Every op the settings' rows name, in table order."""
    ops: list[Op] = []
    for inner in ("linear", "mlp"):

        def triton_run(x: dict[str, torch.Tensor], inner: str = inner) -> torch.Tensor:
            from ttt_mixer.ops import ttt_chunk_triton

            return ttt_chunk_triton(*_ttt_args(inner, x))[0]

        def torch_run(x: dict[str, torch.Tensor], inner: str = inner) -> torch.Tensor:
            from ttt_mixer.ops import ttt_chunk

            return ttt_chunk(*_ttt_args(inner, x))[0]

        ops.append(
            Op(f"ttt-{inner} (ours, Triton)", f"ttt-{inner}", _ttt_inputs(inner, settings), triton_run)
        )
        ops.append(
            Op(
                f"ttt-{inner} (ours, PyTorch)",
                f"ttt-{inner}",
                _ttt_inputs(inner, settings),
                torch_run,
                slow=True,
            )
        )

    def fla_ttt(fused: bool) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        def run(x: dict[str, torch.Tensor]) -> torch.Tensor:
            from fla.ops.ttt import chunk_ttt_linear, fused_chunk_ttt_linear

            op = fused_chunk_ttt_linear if fused else chunk_ttt_linear
            return op(x["q"], x["k"], x["v"], x["ln_weight"], x["ln_bias"], x["eta"], chunk_size=16)[0]

        return run

    def fla_gla(x: dict[str, torch.Tensor]) -> torch.Tensor:
        from fla.ops.gla import chunk_gla

        return chunk_gla(x["q"], x["k"], x["v"], x["g"])[0]

    def fla_gated_delta_rule(x: dict[str, torch.Tensor]) -> torch.Tensor:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return chunk_gated_delta_rule(
            x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True
        )[0]

    ops += [
        Op("fla chunk_ttt_linear", "fla-ttt-linear", _fla_inputs("ttt", settings), fla_ttt(fused=False)),
        Op("fla fused_chunk_ttt_linear", "fla-ttt-linear", _fla_inputs("ttt", settings), fla_ttt(fused=True)),
        Op("fla chunk_gla", "fla-gla", _fla_inputs("gla", settings), fla_gla),
        Op(
            "fla chunk_gated_delta_rule",
            "fla-gated-delta-rule",
            _fla_inputs("gated-delta-rule", settings),
            fla_gated_delta_rule,
        ),
        Op("attention (SDPA flash)", "attention", _fla_inputs("attention", settings), _attention),
    ]
    return [op for op in ops if _selected(op.name, settings.rows)]


def _selected(name: str, rows: tuple[str, ...]) -> bool:
    return not rows or any(pattern in name for pattern in rows)


def time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of fn over repeats, after warmup runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _forward_backward(op: Op, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    leaves = {name: t.detach().requires_grad_(t.is_floating_point()) for name, t in inputs.items()}
    grad = torch.randn_like(op.run(leaves))

    def step() -> None:
        op.run(leaves).backward(grad)

    return step


def _forward(op: Op, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            op.run(inputs)

    return step


def _decode_step(inner: str, settings: Settings, seq_len: int) -> Callable[[], None]:
    """One decode step of ``--decode-batch`` sequences whose state has read seq_len tokens."""
    from ttt_mixer.ops import ttt_chunk_triton, ttt_step_triton

    make = _ttt_inputs(inner, settings)
    with torch.no_grad():
        prefill = make(settings.decode_batch, seq_len)
        _, state = ttt_chunk_triton(*_ttt_args(inner, prefill), output_final_state=True)
        token = {**prefill, **{name: prefill[name][:, -1:].contiguous() for name in ("q", "k", "v", "lr")}}
        del prefill

    def step() -> None:
        with torch.no_grad():
            ttt_step_triton(*_ttt_args(inner, token), initial_state=state)

    return step


def _measure(
    row: Row,
    seq_len: int,
    flops: float,
    build: Callable[[], Callable[[], None]],
    settings: Settings,
    slow: bool,
) -> None:
    """Time one cell of the table, recording an error instead of raising."""
    try:
        step = build()
        warmup, repeats = (1, settings.slow_repeats) if slow else (settings.warmup, settings.repeats)
        ms = time_ms(step, warmup, repeats)
        row.ms[seq_len] = ms
        row.tflops[seq_len] = flops / (ms * 1e-3) / 1e12
    except Exception as error:  # a failing op (missing, out of memory) must not stop the table
        row.ms[seq_len] = row.tflops[seq_len] = None
        row.errors[seq_len] = (
            f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        )
    finally:
        torch.cuda.empty_cache()


def run_table(settings: Settings, report: Callable[[list[Row]], None]) -> list[Row]:
    """Every row of the table, calling report with the rows so far after each one (a run cut short by
    a time limit still leaves what it measured)."""
    rows: list[Row] = []
    d, b = settings.head_dim, settings.mini_batch
    for op in make_ops(settings):
        modes = ["forward+backward"] if op.slow else ["forward", "forward+backward"]
        for mode in modes:
            row = Row(op.name, mode)
            for T in settings.lengths:
                B = max(1, settings.tokens // T)
                flops = FLOPS_PER_TOKEN[op.flops](d, b, T) * B * T * settings.heads
                flops *= 3 if mode == "forward+backward" else 1
                wrap = _forward_backward if mode == "forward+backward" else _forward
                _measure(
                    row,
                    T,
                    flops,
                    lambda op=op, B=B, T=T, wrap=wrap: wrap(op, op.make_inputs(B, T)),
                    settings,
                    op.slow,
                )
                print(f"{row.name:32s} {mode:17s} T={T:6d} {_cell(row, T)}", flush=True)
            rows.append(row)
            report(rows)
        if "(ours, Triton)" in op.name:
            inner = op.flops.removeprefix("ttt-")
            row = Row(op.name, "decode step")
            for T in settings.lengths:
                flops = FLOPS_PER_TOKEN[op.flops](d, 1, T) * settings.decode_batch * settings.heads
                _measure(
                    row, T, flops, lambda inner=inner, T=T: _decode_step(inner, settings, T), settings, False
                )
                print(f"{row.name:32s} {'decode step':17s} T={T:6d} {_cell(row, T)}", flush=True)
            rows.append(row)
            report(rows)
    return rows


# Report ----------------------------------------------------------------------------------------------


def _cell(row: Row, seq_len: int) -> str:
    ms = row.ms.get(seq_len)
    if ms is None:
        return "error" if seq_len in row.errors else "-"
    return f"{ms:.3f} ms / {row.tflops[seq_len]:.1f}"


def _find(rows: list[Row], name: str, mode: str) -> Row | None:
    return next((r for r in rows if r.name == name and r.mode == mode), None)


def check_targets(rows: list[Row]) -> list[dict]:
    """The targets of issue 15 item 5, each with the figures it compares and whether it holds (None
    where a figure is missing)."""

    def ms(name: str, mode: str, seq_len: int) -> float | None:
        row = _find(rows, name, mode)
        return None if row is None else row.ms.get(seq_len)

    linear, mlp = "ttt-linear (ours, Triton)", "ttt-mlp (ours, Triton)"
    fb = "forward+backward"
    targets = []

    def add(
        text: str, ours: float | None, other: float | None, holds: Callable[[float, float], bool]
    ) -> None:
        ok = None if ours is None or other is None else holds(ours, other)
        targets.append({"target": text, "ours_ms": ours, "reference_ms": other, "holds": ok})

    add(
        "TTT-Linear fwd+bwd at T = 8k at least as fast as fla chunk_ttt_linear",
        ms(linear, fb, 8192), ms("fla chunk_ttt_linear", fb, 8192), lambda a, b: a <= b,
    )  # fmt: skip
    for T in (4096, 8192, 16384, 32768):
        add(
            f"TTT-Linear fwd+bwd faster than attention fwd+bwd at T = {T}",
            ms(linear, fb, T), ms("attention (SDPA flash)", fb, T), lambda a, b: a < b,
        )  # fmt: skip
    for inner, name in (("linear", linear), ("mlp", mlp)):
        for T in (1024, 8192):
            add(
                f"TTT-{inner} fwd+bwd at least 20x our PyTorch path at T = {T}",
                ms(name, fb, T), ms(f"ttt-{inner} (ours, PyTorch)", fb, T), lambda a, b: 20 * a <= b,
            )  # fmt: skip
    add(
        "TTT-MLP fwd+bwd within 3x of TTT-Linear at T = 8k",
        ms(mlp, fb, 8192),
        ms(linear, fb, 8192),
        lambda a, b: a <= 3 * b,
    )
    for name in (linear, mlp):
        row = _find(rows, name, "decode step")
        times = [] if row is None else [t for t in row.ms.values() if t is not None]
        spread = max(times) / min(times) if times else None
        targets.append(
            {"target": f"{name} decode time per token flat from 1k to 32k (max / min <= 1.2)", "ratio": spread,
             "holds": None if spread is None else spread <= 1.2}
        )  # fmt: skip
    return targets


def environment() -> dict:
    import triton

    try:
        import fla

        fla_version = fla.__version__
    except ImportError:
        fla_version = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "fla": fla_version,
        "python": platform.python_version(),
    }


def write_report(out: Path, settings: Settings, rows: list[Row], targets: list[dict], seconds: float) -> None:
    env = environment()
    payload = {
        "environment": env,
        "settings": asdict(settings),
        "rows": [asdict(r) for r in rows],
        "targets": targets,
        "seconds": seconds,
    }
    (out / "kernels.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# TTT kernels against fla and flash attention",
        "",
        f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, "
        f"fla {env['fla']}. {settings.dtype}, head dim {settings.head_dim}, {settings.heads} heads, "
        f"{settings.tokens} tokens per batch (B = tokens / T), TTT mini-batch {settings.mini_batch}, "
        f"decode batch {settings.decode_batch}. Cells: milliseconds / TFLOP/s (matrix products only, "
        "forward + backward counted as 3x the forward). Run time "
        f"{seconds:.0f} s.",
        "",
        "| op | mode | " + " | ".join(f"T = {T // 1024}k" for T in settings.lengths) + " |",
        "| --- | --- | " + " | ".join("---" for _ in settings.lengths) + " |",
    ]
    lines += [
        f"| {r.name} | {r.mode} | " + " | ".join(_cell(r, T) for T in settings.lengths) + " |" for r in rows
    ]
    lines += ["", "## Targets", "", "| target | holds | figures |", "| --- | --- | --- |"]
    for t in targets:
        figures = {k: v for k, v in t.items() if k not in ("target", "holds")}
        lines.append(f"| {t['target']} | {t['holds']} | {json.dumps(figures)} |")
    errors = [(r, T, e) for r in rows for T, e in r.errors.items()]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r.name}, {r.mode}, T = {T}: {e}" for r, T, e in errors]
    (out / "kernels.md").write_text("\n".join(lines) + "\n")


# Command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path, bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kernels.md and kernels.json")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="sequence lengths T"
    )
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch (B = tokens / T)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mini-batch", type=int, default=16, help="TTT mini-batch size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--decode-batch", type=int, default=16, help="sequences per decode step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slow-repeats", type=int, default=2, help="timed runs of the PyTorch path")
    parser.add_argument("--rows", nargs="*", default=[], help="only the ops whose name contains one of these")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = parser.parse_args(argv)
    if any(T < 1 for T in args.lengths) or args.tokens < 1 or args.heads < 1 or args.head_dim < 1:
        parser.error("--lengths, --tokens, --heads and --head-dim must be positive")
    if (
        args.repeats < 1
        or args.slow_repeats < 1
        or args.warmup < 0
        or args.decode_batch < 1
        or args.mini_batch < 1
    ):
        parser.error("--repeats, --slow-repeats, --decode-batch and --mini-batch must be >= 1, --warmup >= 0")
    settings = Settings(
        lengths=tuple(args.lengths),
        tokens=args.tokens,
        heads=args.heads,
        head_dim=args.head_dim,
        mini_batch=args.mini_batch,
        dtype=args.dtype,
        decode_batch=args.decode_batch,
        warmup=args.warmup,
        repeats=args.repeats,
        slow_repeats=args.slow_repeats,
        rows=tuple(args.rows),
    )
    return settings, args.out, args.dry_run


def plan(settings: Settings) -> list[str]:
    """One line per op and sequence length: the shapes it runs."""
    return [
        f"{op.name}: T = {T}, B = {max(1, settings.tokens // T)}, H = {settings.heads}, d = {settings.head_dim}"
        for op in make_ops(settings)
        for T in settings.lengths
    ]


def main(argv: list[str] | None = None) -> int:
    settings, out, dry_run = parse_args(argv)
    if dry_run:
        print("\n".join(plan(settings)))
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def report(rows: list[Row]) -> None:
        write_report(out, settings, rows, check_targets(rows), time.perf_counter() - start)

    rows = run_table(settings, report)
    print((out / "kernels.md").read_text())
    # other libraries' ops may be missing or fail on some GPU; ours must run
    return 1 if any(r.errors for r in rows if "(ours" in r.name) else 0


if __name__ == "__main__":
    sys.exit(main())
