"""Tests of the TTT-family ops (``ttt_mixer.ops``, docs/math.md section 13): at the default spec the
reference and the chunked form compute TTT as written out in ``spec_definition``; the chunked form and the decode step against the reference
for every axis (outputs, final state, gradients, float64 and float32), every prefill/continuation
split, packed sequences, Titans' recurrence and LaCT's chunk update written out, and bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from ops_cases import (
    TOLERANCE,
    cat_states,
    detach_state,
    make_inputs,
    max_abs_diff,
    max_state_diff,
    output_and_state_loss,
    select_state,
    spec_definition,
)

from ttt_mixer.ops import (
    FamilySpec,
    family_ops,
    param_shapes,
    ttt_family_chunk,
    ttt_family_reference,
    ttt_family_step,
)
from ttt_mixer.ops.ttt.update import newton_schulz

B, H, D = 2, 2, 4
# id -> spec: TTT, Titans-style per-token momentum and forgetting, LaCT-style apply-then-update with
# SwiGLU, the dot-product loss, momentum, Muon and weight normalisation, and mixtures of the axes
SPECS = {
    "ttt-mlp-b3": FamilySpec("mlp", mini_batch_size=3),
    "titans-linear": FamilySpec("linear", mini_batch_size=4, momentum=True, forgetting=True),
    "titans-mlp-b3": FamilySpec("mlp", mini_batch_size=3, momentum=True, forgetting=True),
    "lact-swiglu": FamilySpec(
        "swiglu", "dot_product", "apply_then_update", 4, momentum=True, weight_norm=True, muon=True
    ),
    "swiglu-dual-dot": FamilySpec("swiglu", "dot_product", mini_batch_size=4, momentum=True, forgetting=True),
    "linear-apply-forget": FamilySpec(
        "linear", order="apply_then_update", mini_batch_size=4, momentum=True, forgetting=True
    ),
}
specs = pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
SEQUENCE_INPUTS = ("q", "k", "v", "lr", "momentum", "forget")


def family_kwargs(
    spec: FamilySpec, batch: int = B, seq_len: int = 11, seed: int = 0, dtype: torch.dtype = torch.float64
) -> dict:
    """Seeded arguments of a family op: ``make_inputs``'s q, k, v, lr, token scale and LayerNorm (none
    for the dot-product loss), initial weights ~ 0.3 N(0, 1), gates eta ~ sigmoid(N(0, 1)) and alpha
    ~ 0.1 sigmoid(N(0, 1)); a per-matrix lr for SwiGLU, as LaCT has."""
    inner = "linear" if spec.inner_model == "swiglu" else spec.inner_model
    inputs = make_inputs(
        inner, batch, seq_len, H, D, spec.mini_batch_size, seed=seed, layer_norm=spec.loss == "reconstruction"
    )
    g = torch.Generator().manual_seed(seed + 100)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    lr = inputs.lr
    if spec.inner_model == "swiglu":
        lr = 0.3 * torch.sigmoid(draw(batch, seq_len, H, 3))
    kwargs = {
        "spec": spec,
        "q": inputs.q,
        "k": inputs.k,
        "v": inputs.v,
        "lr": lr,
        "token_offset": inputs.token_offset,
        "ln_weight": inputs.ln_weight,
        "ln_bias": inputs.ln_bias,
        "params": tuple(0.3 * draw(*shape) for shape in param_shapes(spec, H, D)),
        "momentum": torch.sigmoid(draw(batch, seq_len, H)) if spec.momentum else None,
        "forget": 0.1 * torch.sigmoid(draw(batch, seq_len, H)) if spec.forgetting else None,
    }
    return {name: t.to(dtype) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()} | {
        "params": tuple(p.to(dtype) for p in kwargs["params"])
    }


def tokens(kwargs: dict, start: int, end: int) -> dict:
    return kwargs | {n: kwargs[n][:, start:end] for n in SEQUENCE_INPUTS if kwargs[n] is not None}


def rows(kwargs: dict, index: list[int]) -> dict:
    return kwargs | {n: kwargs[n][index] for n in SEQUENCE_INPUTS if kwargs[n] is not None}


def run(op, kwargs: dict, state=None, **extra) -> tuple:
    return op(**kwargs, initial_state=state, output_final_state=True, **extra)


def assert_agree(got: tuple, expected: tuple, tol: float) -> None:
    (o, state), (o_ref, state_ref) = got, expected
    assert max_abs_diff(o, o_ref) <= tol, f"outputs differ by {max_abs_diff(o, o_ref):.3g}"
    assert max_state_diff(state, state_ref) <= tol, f"states differ by {max_state_diff(state, state_ref):.3g}"


def in_pieces(op_for_length, kwargs: dict, lengths: list[int], state=None) -> tuple:
    outputs, start = [], 0
    for n in lengths:
        o, state = run(op_for_length(n), tokens(kwargs, start, start + n), state)
        outputs.append(o)
        start += n
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
@pytest.mark.parametrize("op", [ttt_family_reference, ttt_family_chunk], ids=["reference", "chunk"])
def test_default_spec_is_ttt(inner_model: str, op) -> None:
    """The default axes are TTT-Linear / TTT-MLP: the outputs and state (W1, b1[, W2, b2], and the
    sums S) of TTT written out in ``spec_definition``."""
    inputs = make_inputs(inner_model, B, 10, H, D, mini_batch_size=4, seed=1)
    spec = FamilySpec(inner_model, mini_batch_size=4)
    o, state = op(spec, *inputs.args()[1:], output_final_state=True)
    o_ref, state_ref = spec_definition(inputs)
    assert max_abs_diff(o, o_ref) <= 1e-10
    assert max_state_diff(state, state_ref) <= 1e-10


@specs
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_chunk_matches_reference(spec: FamilySpec, dtype: torch.dtype) -> None:
    kwargs = family_kwargs(spec, seq_len=2 * spec.mini_batch_size + 3, seed=2, dtype=dtype)
    truth = family_kwargs(spec, seq_len=2 * spec.mini_batch_size + 3, seed=2)
    o_ref, state_ref = run(ttt_family_reference, truth)
    state_ref = tuple(t.to(dtype) if t.is_floating_point() else t for t in state_ref)
    assert_agree(run(ttt_family_chunk, kwargs), (o_ref.to(dtype), state_ref), TOLERANCE[dtype])


@specs
def test_step_chain_matches_reference(spec: FamilySpec) -> None:
    kwargs = family_kwargs(spec, seq_len=2 * spec.mini_batch_size + 1, seed=3)
    chained = in_pieces(lambda n: ttt_family_step, kwargs, [1] * (2 * spec.mini_batch_size + 1))
    assert_agree(chained, run(ttt_family_reference, kwargs), TOLERANCE[torch.float64])


@specs
@pytest.mark.parametrize("split", range(1, 10))
def test_any_split_equals_one_pass(spec: FamilySpec, split: int) -> None:
    """A prefill of ``split`` tokens, then the rest as one chunk or (its first two) decode steps."""
    kwargs = family_kwargs(spec, seq_len=10, seed=4)
    whole = run(ttt_family_chunk, kwargs)
    assert_agree(in_pieces(lambda n: ttt_family_chunk, kwargs, [split, 10 - split]), whole, 1e-10)
    lengths = [split, *[1] * min(2, 10 - split), max(0, 10 - split - 2)]
    pieces = in_pieces(
        lambda n: ttt_family_step if n == 1 else ttt_family_chunk, kwargs, [n for n in lengths if n]
    )
    assert_agree(pieces, whole, 1e-10)


@specs
def test_packed_and_rows_at_different_positions_match_separate(spec: FamilySpec) -> None:
    """Sequences prefilled to different positions, then continued packed (one of them empty) by the
    chunked form and by a decode step, give what each gives alone."""
    kwargs = family_kwargs(spec, batch=3, seq_len=9, seed=5)
    _, state = run(ttt_family_chunk, tokens(kwargs, 0, 5))
    lengths = (3, 0, 4)
    packed = kwargs | {
        n: torch.cat([kwargs[n][i, 5 : 5 + m] for i, m in enumerate(lengths)])[None]
        for n in SEQUENCE_INPUTS
        if kwargs[n] is not None
    }
    cu_seqlens = torch.tensor([0, 3, 3, 7])
    o, final = run(ttt_family_chunk, packed, state, cu_seqlens=cu_seqlens)
    expected_o, expected_states = [], []
    for i, m in enumerate(lengths):
        alone = rows(kwargs, [i])
        if m == 0:
            expected_states.append(select_state(state, i))
            continue
        o_i, s_i = run(ttt_family_reference, tokens(alone, 5, 5 + m), select_state(state, i))
        expected_o.append(o_i)
        expected_states.append(s_i)
    assert_agree((o, final), (torch.cat(expected_o, dim=1), cat_states(expected_states)), 1e-10)
    one_each = kwargs | {n: kwargs[n][[0, 2], 5][None] for n in SEQUENCE_INPUTS if kwargs[n] is not None}
    o_step, final_step = run(ttt_family_step, one_each, state, cu_seqlens=torch.tensor([0, 1, 1, 2]))
    o_rows, final_rows = run(ttt_family_step, tokens(kwargs, 5, 6), state)
    assert max_abs_diff(o_step[0], o_rows[[0, 2], 0]) <= 1e-10
    kept = tuple(
        torch.where((torch.arange(3) == 1).reshape(-1, *[1] * (s.dim() - 1)), s, r)
        for s, r in zip(state, final_rows, strict=True)
    )
    assert max_state_diff(final_step, kept) <= 1e-10


def gradients(op, kwargs: dict, state) -> list[torch.Tensor]:
    names = [
        n
        for n in ("q", "k", "v", "lr", "token_offset", "ln_weight", "ln_bias", "momentum", "forget")
        if kwargs[n] is not None
    ]
    leaves = {n: kwargs[n].detach().clone().requires_grad_() for n in names}
    params = [p.detach().clone().requires_grad_() for p in kwargs["params"]]
    state = detach_state(state, requires_grad=True)
    o, final = run(op, kwargs | leaves | {"params": tuple(params)}, state)
    inputs = list(leaves.values()) + params + [t for t in state if t.is_floating_point()]
    grads = torch.autograd.grad(output_and_state_loss(o, final), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]


@specs
def test_gradients_match_reference(spec: FamilySpec) -> None:
    """Gradients of outputs and final state w.r.t. every input, the initial weights (read by weight
    normalisation) and a mid-mini-batch state, float64."""
    kwargs = family_kwargs(spec, seq_len=spec.mini_batch_size + 4, seed=6)
    _, state = run(ttt_family_chunk, tokens(kwargs, 0, 2))
    rest = tokens(kwargs, 2, spec.mini_batch_size + 4)
    for got, expected in zip(
        gradients(ttt_family_chunk, rest, state), gradients(ttt_family_reference, rest, state), strict=True
    ):
        assert max_abs_diff(got, expected) <= 1e-9


def test_titans_recurrence_written_out() -> None:
    """Linear memory, plain L2 loss, mini-batch 1, no token scale: Titans' S_t = eta_t S_{t-1} -
    theta_t grad, M_t = (1 - alpha_t) M_{t-1} + S_t, y_t = q~_t M_t (on augmented rows)."""
    spec = FamilySpec("linear", mini_batch_size=1, momentum=True, forgetting=True)
    kwargs = family_kwargs(spec, seq_len=7, seed=7) | {
        "token_offset": None,
        "ln_weight": None,
        "ln_bias": None,
    }
    w1, b1 = kwargs["params"]
    memory = torch.cat([w1, b1[:, None]], dim=1).expand(B, -1, -1, -1)
    momentum = torch.zeros_like(memory)
    ones = torch.ones(B, 7, H, 1, dtype=torch.float64)
    keys, queries = (torch.cat([kwargs[n], ones], -1) for n in ("k", "q"))
    expected = []
    for t in range(7):
        key = keys[:, t, :, None]
        grad = key.transpose(-1, -2) @ (key @ memory - kwargs["v"][:, t, :, None])
        momentum = (
            kwargs["momentum"][:, t, :, None, None] * momentum - kwargs["lr"][:, t, :, None, None] * grad
        )
        memory = (1 - kwargs["forget"][:, t, :, None, None]) * memory + momentum
        expected.append((queries[:, t, :, None] @ memory)[..., 0, :])
    for op in (ttt_family_reference, ttt_family_chunk):
        o, state = run(op, kwargs)
        assert max_abs_diff(o, torch.stack(expected, dim=1)) <= 1e-12
        assert max_abs_diff(state[1], memory[..., :-1, :]) <= 1e-12
        assert max_abs_diff(state[2], memory[..., -1, :]) <= 1e-12


def test_lact_chunk_update_written_out() -> None:
    """LaCT's block-causal update as its paper writes it, column vectors and W [out, in]: a chunk's
    queries read the weights before it; then dW = sum_j lr_j (dot-product gradient), dW <- dW +
    mean(m) dW_prev, dW <- NS(dW), W <- W + dW, and each row of W back to its initial norm."""
    spec = SPECS["lact-swiglu"]
    b, T = spec.mini_batch_size, 11
    kwargs = family_kwargs(spec, seq_len=T, seed=8) | {"token_offset": None}
    w0, w2, w1 = (p.transpose(-1, -2) for p in kwargs["params"])  # gate, up [dh, d]; down [d, dh]
    norms = [w.norm(dim=-1, keepdim=True) for w in (w0, w2, w1)]
    previous = [torch.zeros(B, *w.shape, dtype=torch.float64) for w in (w0, w2, w1)]
    w0, w2, w1 = (w.expand(B, -1, -1, -1) for w in (w0, w2, w1))
    outputs = []
    for start in range(0, T, b):
        q, k, v = (kwargs[n][:, start : start + b].transpose(1, 2) for n in ("q", "k", "v"))  # [B, H, n, d]
        lr = kwargs["lr"][:, start : start + b].transpose(1, 2)  # [B, H, n, 3]
        outputs.append(((F.silu(q @ w0.mT) * (q @ w2.mT)) @ w1.mT).transpose(1, 2))
        if k.shape[2] < b:
            break
        gate, up = k @ w0.mT, k @ w2.mT
        hidden = F.silu(gate) * up
        d_hidden = v @ w1
        sig = torch.sigmoid(gate)
        d_gate = d_hidden * up * sig * (1 + gate * (1 - sig))
        steps = [
            (d_gate * lr[..., 0:1]).mT @ k,
            (d_hidden * F.silu(gate) * lr[..., 1:2]).mT @ k,
            (v * lr[..., 2:3]).mT @ hidden,
        ]
        mean_m = kwargs["momentum"][:, start : start + b].mean(1)[..., None, None]
        steps = [s + mean_m * p for s, p in zip(steps, previous, strict=True)]
        previous = steps
        new = [w + newton_schulz(s) for w, s in zip((w0, w2, w1), steps, strict=True)]
        w0, w2, w1 = (w / (w.norm(dim=-1, keepdim=True) + 1e-5) * n for w, n in zip(new, norms, strict=True))
    o, state = run(ttt_family_chunk, kwargs)
    assert max_abs_diff(o, torch.cat(outputs, dim=1)) <= 1e-12
    assert max_abs_diff(state[1], w0.mT) <= 1e-12


def test_newton_schulz_orthogonalises() -> None:
    g = torch.Generator().manual_seed(9)
    update = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    singular = torch.linalg.svdvals(newton_schulz(update))
    # the quintic iteration trades exactness for speed: singular values land near 1, not on it
    assert ((singular > 0.6) & (singular < 1.25)).all()


# id -> (change to family_kwargs(spec), error, message)
BAD = {
    "spec-type": (lambda kw: kw | {"spec": "titans"}, TypeError, "spec must be a FamilySpec"),
    "momentum-missing": (lambda kw: kw | {"momentum": None}, ValueError, "momentum must be a"),
    "forget-unexpected": (lambda kw: kw | {"forget": kw["lr"][..., 0]}, ValueError, "forget must be a"),
    "lr-shape": (lambda kw: kw | {"lr": kw["lr"][..., :2]}, ValueError, "lr must have shape"),
    "dot-with-layer-norm": (
        lambda kw: (
            kw
            | {
                "ln_weight": torch.ones(H, D, dtype=torch.float64),
                "ln_bias": torch.zeros(H, D, dtype=torch.float64),
            }
        ),
        ValueError,
        "dot_product loss takes no inner LayerNorm",
    ),
    "params-count": (lambda kw: kw | {"params": kw["params"][:2]}, ValueError, "takes 3 inner weights"),
    "token_offset-size": (
        lambda kw: kw | {"token_offset": kw["token_offset"][:2]},
        ValueError,
        "token_offset must have shape",
    ),
    "state-length": (
        lambda kw: kw | {"initial_state": (torch.zeros(B, dtype=torch.long),)},
        ValueError,
        "initial_state does not belong",
    ),
}


@pytest.mark.parametrize(
    "op", [ttt_family_reference, ttt_family_chunk, ttt_family_step], ids=["reference", "chunk", "step"]
)
@pytest.mark.parametrize("change, error, message", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_before_work(op, change, error: type, message: str) -> None:
    kwargs = tokens(family_kwargs(SPECS["lact-swiglu"], seq_len=1), 0, 1)
    with pytest.raises(error, match=message):
        op(**change(kwargs))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"inner_model": "rnn"}, "inner_model must be one of"),
        ({"loss": "l1"}, "loss must be one of"),
        ({"mini_batch_size": 0}, "mini_batch_size must be an int"),
        ({"muon": True}, "need order='apply_then_update'"),
        ({"weight_norm": True}, "need order='apply_then_update'"),
    ],
)
def test_bad_spec_raises(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(FamilySpec(), **fields)


def test_family_ops_choose_triton_for_ttt_only() -> None:
    """One dispatcher for every spec: PyTorch runs them all; Triton runs TTT-Linear and TTT-MLP and
    refuses any other spec, a gate, or an unknown backend, before any work."""
    assert family_ops(SPECS["titans-linear"], "torch") == (ttt_family_chunk, ttt_family_step)
    with pytest.raises(ValueError, match="Triton kernels cover TTT-Linear and TTT-MLP only"):
        family_ops(SPECS["titans-linear"], "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        family_ops(SPECS["ttt-mlp-b3"], "cuda")
    spec = SPECS["ttt-mlp-b3"]
    chunk_op, _ = family_ops(spec, "triton")
    kwargs = family_kwargs(spec, seq_len=5)
    with pytest.raises(ValueError, match="momentum and forget must be None"):
        chunk_op(**kwargs | {"momentum": kwargs["lr"]})
    with pytest.raises(ValueError, match=r"token_offset must have shape \[mini_batch_size\] = \[3\]"):
        chunk_op(**kwargs | {"token_offset": kwargs["token_offset"][:2]})
