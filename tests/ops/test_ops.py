"""Tests of the pure TTT ops (docs/math.md): the chunked dual form ``ttt_chunk`` and the decode step
``ttt_step`` against the token-by-token primal form ``ttt_primal``, exact continuation from a state
(prefill, decoding, mid-mini-batch chunks, rows at different positions, packed sequences), the
closed-form pieces, the checks of docs/math.md section 11 and input validation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from ops_cases import (
    PARAM_NAMES,
    TOLERANCE,
    Op,
    State,
    TTTInputs,
    assert_matches,
    cat_batches,
    cat_states,
    detach_state,
    make_inputs,
    make_state,
    max_abs_diff,
    output_and_state_loss,
    run,
    select_state,
    spec_definition,
)

from ttt_mixer.ops import (
    INNER_MODELS,
    initial_state,
    state_length,
    token_scale,
    ttt_chunk,
    ttt_primal,
    ttt_spec,
    ttt_step,
)
from ttt_mixer.ops.ttt.inner import GeluTanhWithGrad, LayerNormL2Grad, param_shapes, with_ones
from ttt_mixer.ops.ttt.reference import reference_gelu_tanh_grad, reference_ln_fused_l2_grad

GRAD_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}

inner_models = pytest.mark.parametrize("inner_model", INNER_MODELS)
dtypes = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


def run_in_pieces(
    inputs: TTTInputs,
    lengths: Sequence[int],
    state: State | None = None,
    op_for_length: Callable[[int], Op] = lambda n: ttt_chunk,
) -> tuple[torch.Tensor, State]:
    """Read the sequences in consecutive pieces of the given lengths, each piece continuing from the
    final state of the previous one; returns all outputs [B, sum(lengths), H, d] and the last state."""
    assert sum(lengths) == inputs.seq_len
    outputs, start = [], 0
    for n in lengths:
        if n:
            o, state = run(op_for_length(n), inputs.tokens(start, start + n), state)
            outputs.append(o)
            start += n
    return torch.cat(outputs, dim=1), state


def fresh_state(inputs: TTTInputs, num_sequences: int) -> State:
    """The explicit state before any token (the inner model's own weights, position 0)."""
    spec = ttt_spec(inputs.inner_model, inputs.mini_batch_size)
    return initial_state(spec, list(inputs.params), num_sequences)


# ttt_chunk against the primal form ----------------------------------------------------------------

# (batch, seq_len, mini_batch_size, layer_norm)
CHUNK_SHAPES = {
    "T<b": (2, 3, 4, True),
    "T%b!=0": (2, 10, 4, True),
    "T%b==0": (2, 12, 4, True),
    "b=1": (2, 7, 1, True),
    "b=5": (3, 13, 5, True),
    "no-LN": (2, 10, 4, False),
}


@inner_models
@dtypes
@pytest.mark.parametrize("shape", CHUNK_SHAPES.values(), ids=CHUNK_SHAPES.keys())
def test_chunk_matches_primal(inner_model: str, dtype: torch.dtype, shape: tuple) -> None:
    batch, seq_len, b, layer_norm = shape
    inputs = make_inputs(
        inner_model, batch, seq_len, mini_batch_size=b, dtype=dtype, layer_norm=layer_norm, seed=seq_len
    )
    # the truth is the primal form in float64 on the same numbers: docs/conventions.md section 6 bounds the error
    # of each path, and a float32 primal form would add its own (1e-5 on its own in the b=5 case)
    truth = inputs.with_tensors({name: t.double() for name, t in inputs.float_tensors().items()})
    o_ref, state_ref = run(ttt_primal, truth)
    state_ref = tuple(t.to(dtype) if t.is_floating_point() else t for t in state_ref)
    assert_matches(run(ttt_chunk, inputs), (o_ref.to(dtype), state_ref), TOLERANCE[dtype])


@inner_models
@pytest.mark.parametrize("layer_norm", [True, False], ids=["LN", "no-LN"])
def test_primal_matches_spec_definition(inner_model: str, layer_norm: bool) -> None:
    """The ground truth itself, with its closed-form LayerNorm and GELU gradients, against autograd."""
    inputs = make_inputs(
        inner_model, batch_size=2, seq_len=7, mini_batch_size=3, layer_norm=layer_norm, seed=4
    )
    assert_matches(run(ttt_primal, inputs), spec_definition(inputs), TOLERANCE[torch.float64])


@inner_models
@pytest.mark.parametrize("op", [ttt_primal, ttt_chunk, ttt_step], ids=["primal", "chunk", "step"])
def test_final_state_layout(inner_model: str, op: Op) -> None:
    inputs = make_inputs(inner_model, batch_size=3, seq_len=1, num_heads=2, head_dim=4, mini_batch_size=4)
    _, default_state = op(*inputs.args())
    # only the decode step returns its state by default
    assert (default_state is not None) == (op is ttt_step)
    _, state = run(op, inputs)
    spec = ttt_spec(inner_model, 4)
    assert len(state) == state_length(spec)
    assert state[0].dtype == torch.long and state[0].tolist() == [1, 1, 1]
    shapes = [s[1:] for s in param_shapes(spec, 2, 4)]
    assert [tuple(t.shape) for t in state[1:]] == [(3, 2, *s) for s in shapes + shapes]


# Gradients ----------------------------------------------------------------------------------------


def gradients(op: Op, inputs: TTTInputs, state: State | None) -> dict[str, torch.Tensor]:
    """Gradients of ``output_and_state_loss`` w.r.t. every floating input and initial-state tensor
    (zeros for an input the op does not read, such as the params when a state is given)."""
    input_leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.float_tensors().items()}
    leaves = dict(input_leaves)
    if state is not None:
        state = detach_state(state, requires_grad=True)
        leaves |= {f"initial_state[{i}]": t for i, t in enumerate(state) if t.is_floating_point()}
    o, final = run(op, inputs.with_tensors(input_leaves), state)
    grads = torch.autograd.grad(
        output_and_state_loss(o, final, seed=1), list(leaves.values()), allow_unused=True
    )
    return {
        name: torch.zeros_like(t) if g is None else g
        for (name, t), g in zip(leaves.items(), grads, strict=True)
    }


@inner_models
@dtypes
@pytest.mark.parametrize("start_positions", [None, (1, 3)], ids=["no-state", "mid-mini-batch-state"])
def test_chunk_gradients_match_primal(inner_model: str, dtype: torch.dtype, start_positions) -> None:
    inputs = make_inputs(inner_model, batch_size=2, seq_len=10, mini_batch_size=4, dtype=dtype, seed=5)
    state = None if start_positions is None else make_state(inner_model, start_positions, dtype=dtype, seed=6)
    grads, grads_ref = gradients(ttt_chunk, inputs, state), gradients(ttt_primal, inputs, state)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        # the inner params are read only when no state is given
        assert bool(grad.abs().max() > 0) == (state is None or name not in PARAM_NAMES), name
        # float32: as if the loss were scaled to make this gradient at most of order one (the
        # gradients w.r.t. a state's MLP biases reach a few hundred)
        scale = max(1.0, grads_ref[name].abs().max().item()) if dtype == torch.float32 else 1.0
        diff = max_abs_diff(grad, grads_ref[name]) / scale
        assert diff <= GRAD_TOLERANCE[dtype], (
            f"d loss / d {name} differs by {diff:.3g} (scaled by 1/{scale:.3g})"
        )


@inner_models
@pytest.mark.parametrize("start_positions", [None, (1,)], ids=["no-state", "mid-mini-batch-state"])
def test_chunk_gradcheck(inner_model: str, start_positions) -> None:
    """Finite differences of ttt_chunk (outputs and final state) agree with autograd, float64."""
    inputs = make_inputs(
        inner_model, batch_size=1, seq_len=5, num_heads=1, head_dim=3, mini_batch_size=2, seed=7
    )
    names = list(inputs.float_tensors())
    state = None
    leaves = list(inputs.float_tensors().values())
    if start_positions is not None:
        state = make_state(inner_model, start_positions, num_heads=1, head_dim=3, seed=8)
        # the params are not read when a state is given
        names = [n for n in names if n not in PARAM_NAMES]
        leaves = [inputs.float_tensors()[n] for n in names] + list(state[1:])
    leaves = [t.detach().clone().requires_grad_() for t in leaves]

    def outputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = inputs.with_tensors(dict(zip(names, tensors, strict=False)))
        start = None if state is None else (state[0], *tensors[len(names) :])
        o, final = run(ttt_chunk, given, start)
        return (o, *final[1:])

    assert torch.autograd.gradcheck(outputs, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


# Decoding and continuation ------------------------------------------------------------------------


@inner_models
@pytest.mark.parametrize("start_positions", [None, (2, 0)], ids=["no-state", "mid-mini-batch-state"])
def test_step_chain_matches_primal(inner_model: str, start_positions) -> None:
    inputs = make_inputs(inner_model, batch_size=2, seq_len=11, mini_batch_size=4, seed=9)
    state = None if start_positions is None else make_state(inner_model, start_positions, seed=10)
    chained = run_in_pieces(inputs, [1] * inputs.seq_len, state, op_for_length=lambda n: ttt_step)
    assert_matches(chained, run(ttt_primal, inputs, state), TOLERANCE[torch.float64])


SPLIT_B = 4
SPLIT_T = 3 * SPLIT_B + 2


@inner_models
@pytest.mark.parametrize("split", range(3 * SPLIT_B + 2))
def test_prefill_then_continuation_matches_one_pass(inner_model: str, split: int) -> None:
    """Any split point, including mid-mini-batch ones, gives the outputs and state of one pass."""
    inputs = make_inputs(inner_model, batch_size=2, seq_len=SPLIT_T, mini_batch_size=SPLIT_B, seed=11)
    # split 0: the whole sequence is a continuation of the explicit state before any token
    start = fresh_state(inputs, 2) if split == 0 else None
    pieces = run_in_pieces(inputs, [split, SPLIT_T - split], start)
    assert_matches(pieces, run(ttt_primal, inputs), TOLERANCE[torch.float64])


# (piece lengths, mini-batch size 4): single tokens, mid-mini-batch starts, pieces crossing boundaries
PIECES = [(1, 5, 2, 6), (3, 1, 1, 9), (6, 7, 1), (2, 2, 4, 6), (5, 9)]


@inner_models
@pytest.mark.parametrize("lengths", PIECES, ids=lambda p: "-".join(map(str, p)))
@pytest.mark.parametrize(
    "mode", ["chunk", "primal", "chunk+step"], ids=["chunk", "primal", "chunk-and-step-for-single-tokens"]
)
def test_multi_piece_continuation_matches_one_pass(inner_model: str, lengths: tuple, mode: str) -> None:
    inputs = make_inputs(inner_model, batch_size=2, seq_len=sum(lengths), mini_batch_size=4, seed=12)
    ops = {
        "chunk": lambda n: ttt_chunk,
        "primal": lambda n: ttt_primal,
        "chunk+step": lambda n: ttt_step if n == 1 else ttt_chunk,
    }
    pieces = run_in_pieces(inputs, lengths, op_for_length=ops[mode])
    assert_matches(pieces, run(ttt_primal, inputs), TOLERANCE[torch.float64])


@inner_models
def test_rows_at_different_positions(inner_model: str) -> None:
    """Rows prefilled to different positions in their mini-batch, then continued together by one
    [B, T] chunk, give what each row gives alone and what one pass over each whole row gives."""
    b, continuation = 4, 7
    prefill_lengths = (5, 3, 8, 2)  # positions 1, 3, 0, 2
    inputs = make_inputs(
        inner_model, batch_size=4, seq_len=max(prefill_lengths) + continuation, mini_batch_size=b, seed=13
    )
    packed, cu_seqlens = inputs.packed(prefill_lengths)
    _, state = run(ttt_chunk, packed, cu_seqlens=cu_seqlens)
    assert state[0].tolist() == [n % b for n in prefill_lengths]

    rows = [inputs.rows(n).tokens(p, p + continuation) for n, p in enumerate(prefill_lengths)]
    o, final = run(ttt_chunk, cat_batches(rows), state)
    for n, (row, p) in enumerate(zip(rows, prefill_lengths, strict=True)):
        o_row, final_row = o[n : n + 1], select_state(final, n)
        assert_matches(
            (o_row, final_row), run(ttt_chunk, row, select_state(state, n)), TOLERANCE[torch.float64]
        )
        o_whole, final_whole = run(ttt_primal, inputs.rows(n).tokens(0, p + continuation))
        assert_matches((o_row, final_row), (o_whole[:, p:], final_whole), TOLERANCE[torch.float64])


# Packed sequences (cu_seqlens) ----------------------------------------------------------------------


def run_separately(op: Op, inputs: TTTInputs, lengths: Sequence[int], state: State | None) -> tuple:
    """Each row's first lengths[n] tokens on its own; a row without tokens keeps its state."""
    outputs, finals = [], []
    for n, length in enumerate(lengths):
        start = None if state is None else select_state(state, n)
        if length == 0:
            finals.append(fresh_state(inputs, 1) if start is None else start)
            continue
        o, final = run(op, inputs.rows(n).tokens(0, length), start)
        outputs.append(o)
        finals.append(final)
    return torch.cat(outputs, dim=1), cat_states(finals)


@inner_models
@pytest.mark.parametrize("op", [ttt_chunk, ttt_primal], ids=["chunk", "primal"])
@pytest.mark.parametrize("start_positions", [None, (1, 2, 0, 3)], ids=["no-state", "mid-mini-batch-state"])
def test_packed_matches_separate(inner_model: str, op: Op, start_positions) -> None:
    lengths = (5, 0, 3, 9)  # an empty sequence and one shorter than b = 4
    inputs = make_inputs(inner_model, batch_size=4, seq_len=max(lengths), mini_batch_size=4, seed=14)
    state = None if start_positions is None else make_state(inner_model, start_positions, seed=15)
    packed, cu_seqlens = inputs.packed(lengths)
    expected = run_separately(ttt_primal, inputs, lengths, state)
    assert_matches(run(op, packed, state, cu_seqlens), expected, TOLERANCE[torch.float64])


@inner_models
@pytest.mark.parametrize("start_positions", [None, (3, 3, 0, 2)], ids=["no-state", "mid-mini-batch-state"])
def test_step_packed_matches_separate(inner_model: str, start_positions) -> None:
    # position 3 of 4: a step closes a mini-batch; a sequence without a token keeps its state even there
    lengths = (1, 0, 1, 1)
    inputs = make_inputs(inner_model, batch_size=4, seq_len=1, mini_batch_size=4, seed=16)
    state = None if start_positions is None else make_state(inner_model, start_positions, seed=17)
    packed, cu_seqlens = inputs.packed(lengths)
    expected = run_separately(ttt_primal, inputs, lengths, state)
    assert_matches(run(ttt_step, packed, state, cu_seqlens), expected, TOLERANCE[torch.float64])


# docs/math.md section 11 ------------------------------------------------------------------------------------

reference_ops = pytest.mark.parametrize("op", [ttt_primal, ttt_chunk], ids=["primal", "chunk"])


@reference_ops
def test_theorem1_linear_attention(op: Op) -> None:
    """TTT-Linear with b = T, W0 = 0, b1 = 0, f = f_res, lr = 1 and tau_i = 1 is causal linear
    attention. The inner bias b1 is learnt like a weight row on a constant input 1, so the attention
    runs on keys and queries augmented with a trailing 1:
    o_i = sum_{j <= i} ([q_i, 1] . [k_j, 1]) v_j. With the plain features (q_i . k_j) it does NOT
    match: the bias adds sum_{j <= i} v_j to every output (asserted below)."""
    T = 6
    inputs = make_inputs("linear", batch_size=2, seq_len=T, mini_batch_size=T, layer_norm=False, seed=18)
    i = torch.arange(1, T + 1, dtype=torch.float64)
    inputs = replace(
        inputs,
        lr=torch.ones_like(inputs.lr),
        token_offset=1.0 - 1.0 / i,  # tau_i = 1/i + eps_i = 1
        params=tuple(torch.zeros_like(p) for p in inputs.params),
    )
    o, _ = run(op, inputs, final=False)

    def causal_linear_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("bihe,bjhe->bhij", queries, keys).tril()
        return torch.einsum("bhij,bjhd->bihd", scores, inputs.v)

    augmented = causal_linear_attention(with_ones(inputs.q), with_ones(inputs.k))
    assert max_abs_diff(o, augmented) <= 1e-10
    assert max_abs_diff(o, causal_linear_attention(inputs.q, inputs.k)) > 0.1


@reference_ops
def test_unit_mini_batch_is_delta_rule(op: Op) -> None:
    """With b = 1 and f = f_res, each token takes one gradient step on its own loss before it is
    read (the delta rule on augmented keys, S = [W1; b1]):
    S_t = S_{t-1} - beta_t k_t^T (k_t S_{t-1} - v_t), beta_t = tau_1 lr_t, o_t = q_t S_t."""
    inputs = make_inputs("linear", batch_size=2, seq_len=9, mini_batch_size=1, layer_norm=False, seed=19)
    o, final = run(op, inputs)

    w1, b1 = inputs.params
    memory = torch.cat([w1, b1[:, None]], dim=1).expand(2, -1, -1, -1)  # [B, H, d + 1, d]
    beta = token_scale(inputs.token_offset)[0] * inputs.lr  # [B, T, H]
    keys, queries = with_ones(inputs.k), with_ones(inputs.q)
    expected = []
    for t in range(inputs.seq_len):
        key = keys[:, t, :, None, :]  # [B, H, 1, d + 1]
        error = key @ memory - inputs.v[:, t, :, None, :]
        memory = memory - beta[:, t, :, None, None] * key.transpose(-1, -2) @ error
        expected.append(queries[:, t, :, None, :] @ memory)
    expected_state = (torch.zeros(2, dtype=torch.long), memory[..., :-1, :], memory[..., -1, :])
    expected_state += (torch.zeros_like(expected_state[1]), torch.zeros_like(expected_state[2]))
    assert_matches((o, final), (torch.cat(expected, dim=2).transpose(1, 2), expected_state), 1e-10)


# Closed-form pieces -------------------------------------------------------------------------------------


def test_reference_ln_fused_l2_grad_matches_autograd() -> None:
    g = torch.Generator().manual_seed(20)
    heads, tokens, d, eps = 2, 5, 6, 1e-6
    z = torch.randn(heads, tokens, d, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(heads, tokens, d, generator=g, dtype=torch.float64)
    weight = 1.0 + 0.3 * torch.randn(heads, 1, d, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(heads, 1, d, generator=g, dtype=torch.float64)
    loss = 0.5 * ((F.layer_norm(z, (d,), eps=eps) * weight + bias - target) ** 2).sum()
    (expected,) = torch.autograd.grad(loss, z)
    assert max_abs_diff(reference_ln_fused_l2_grad(z.detach(), target, weight, bias, eps), expected) <= 1e-12


def test_layer_norm_l2_grad_function_matches_closed_form_and_its_gradients() -> None:
    """The fast LayerNormL2Grad of the chunked and decode paths: its value is the reference closed form,
    its hand-derived backward agrees with finite differences for z, the target, the weight and the bias."""
    g = torch.Generator().manual_seed(21)
    heads, tokens, d, eps = 2, 5, 6, 1e-6
    z = 0.5 + torch.randn(heads, tokens, d, generator=g, dtype=torch.float64)
    target = torch.randn(heads, tokens, d, generator=g, dtype=torch.float64)
    weight = 1.0 + 0.3 * torch.randn(heads, 1, d, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(heads, 1, d, generator=g, dtype=torch.float64)
    expected = reference_ln_fused_l2_grad(z, target, weight, bias, eps)
    assert max_abs_diff(LayerNormL2Grad.apply(z, bias - target, weight, eps), expected) <= 1e-12
    inputs = tuple(t.clone().requires_grad_() for t in (z, target, weight, bias))
    assert torch.autograd.gradcheck(lambda z, t, w, b: LayerNormL2Grad.apply(z, b - t, w, eps), inputs)


def test_reference_gelu_tanh_grad_matches_autograd() -> None:
    x = torch.cat([torch.linspace(-8, 8, 161, dtype=torch.float64), torch.randn(50, dtype=torch.float64)])
    x.requires_grad_()
    (expected,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    assert max_abs_diff(reference_gelu_tanh_grad(x.detach()), expected) <= 1e-12


def test_gelu_tanh_with_grad_function_matches_and_differentiates() -> None:
    """The fast GeluTanhWithGrad of TTT-MLP: its two outputs are gelu and the reference gelu', and its
    hand-derived backward (gelu'' included) agrees with finite differences."""
    x = torch.cat([torch.linspace(-6, 6, 49, dtype=torch.float64), torch.randn(20, dtype=torch.float64)])
    gelu, grad = GeluTanhWithGrad.apply(x)
    assert max_abs_diff(gelu, F.gelu(x, approximate="tanh")) <= 1e-12
    assert max_abs_diff(grad, reference_gelu_tanh_grad(x)) <= 1e-12
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: GeluTanhWithGrad.apply(x), (x,))
    assert torch.autograd.gradcheck(lambda x: GeluTanhWithGrad.apply(x)[1], (x,))


def test_token_scale_clamps_at_zero() -> None:
    token_offset = torch.tensor([-2.0, 0.0, 0.1, -0.3], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.5, 1 / 3 + 0.1, 0.0], dtype=torch.float64)  # max(0, 1/i + eps_i)
    assert torch.allclose(token_scale(token_offset), expected, rtol=0, atol=1e-15)


# Half precision -------------------------------------------------------------------------------------------


@inner_models
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_dtypes(inner_model: str, dtype: torch.dtype) -> None:
    """Half-precision inputs give outputs in their dtype and a float32 state (accuracy is tested on
    a GPU); the float32 state continues a half-precision chunk and a decode step."""
    inputs = make_inputs(inner_model, batch_size=2, seq_len=7, mini_batch_size=4, dtype=dtype, seed=21)
    _, state = run(ttt_chunk, inputs.tokens(0, 5))
    for op, piece in ((ttt_chunk, inputs.tokens(5, 6)), (ttt_step, inputs.tokens(6, 7))):
        o, state = run(op, piece, state)
        assert o.dtype == dtype and torch.isfinite(o).all()
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state[1:])


# Input validation --------------------------------------------------------------------------------------------


def valid_kwargs(inner_model: str = "linear") -> dict:
    """Valid float32 arguments (B = 2, T = 6, H = 2, d = 4, b = 4) by parameter name."""
    inputs = make_inputs(inner_model, batch_size=2, seq_len=6, mini_batch_size=4, dtype=torch.float32)
    names = ("inner_model", "q", "k", "v", "lr", "token_offset", "ln_weight", "ln_bias", "params")
    return dict(zip(names, inputs.args(), strict=True))


def one_row(kw: dict) -> dict:
    return kw | {name: kw[name][:1] for name in ("q", "k", "v", "lr")}


def no_tokens(kw: dict) -> dict:
    return kw | {name: kw[name][:, :0] for name in ("q", "k", "v", "lr")}


def state(*positions: int, inner_model: str = "linear") -> State:
    return make_state(inner_model, positions, dtype=torch.float32)


# id -> (change to valid_kwargs(), error type, message pattern)
BAD_INPUTS = {
    "q-rank-3": (lambda kw: kw | {"q": kw["q"][0]}, ValueError, r"q must have rank 4"),
    "k-shape": (lambda kw: kw | {"k": kw["k"][:, :-1]}, ValueError, r"k must have shape"),
    "integer-q": (lambda kw: kw | {"q": kw["q"].long()}, TypeError, r"q must be a floating-point"),
    "lr-float64": (lambda kw: kw | {"lr": kw["lr"].double()}, TypeError, r"lr has dtype torch.float64"),
    "ln_weight-shape": (
        lambda kw: kw | {"ln_weight": kw["ln_weight"][:, :-1]},
        ValueError,
        r"ln_weight must",
    ),
    "ln_bias-missing": (lambda kw: kw | {"ln_bias": None}, ValueError, r"ln_weight and ln_bias"),
    "missing-b1": (
        lambda kw: kw | {"params": kw["params"][:1]},
        ValueError,
        r"TTT-linear takes 2 inner weights",
    ),
    "inner_model-rnn": (lambda kw: kw | {"inner_model": "rnn"}, ValueError, r"inner_model must be one of"),
    "empty-sequence": (no_tokens, ValueError, r"q must hold at least one token"),
    "cu_seqlens-batch-2": (
        lambda kw: kw | {"cu_seqlens": torch.tensor([0, 3, 6])},
        ValueError,
        r"with cu_seqlens, q must have batch size 1",
    ),
    "cu_seqlens-end": (
        lambda kw: one_row(kw) | {"cu_seqlens": torch.tensor([0, 2, 5])},
        ValueError,
        r"cu_seqlens must start at 0 and end at T",
    ),
    "cu_seqlens-decreasing": (
        lambda kw: one_row(kw) | {"cu_seqlens": torch.tensor([0, 4, 2, 6])},
        ValueError,
        r"cu_seqlens must be non-decreasing",
    ),
    "state-layer-type": (
        lambda kw: valid_kwargs("mlp") | {"initial_state": state(0, 0)},
        ValueError,
        r"initial_state does not belong to a TTT-mlp layer",
    ),
    "state-batch-size": (
        lambda kw: kw | {"initial_state": state(0, 0, 0)},
        ValueError,
        r"initial_state holds 3 sequences but the input has 2",
    ),
    "state-position": (
        lambda kw: kw | {"initial_state": state(0, 4)},
        ValueError,
        r"initial_state positions must lie in \[0, mini_batch_size = 4\)",
    ),
}


@pytest.mark.parametrize("op", [ttt_primal, ttt_chunk, ttt_step], ids=["primal", "chunk", "step"])
@pytest.mark.parametrize("change, error, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises(op: Op, change: Callable[[dict], dict], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        op(**change(valid_kwargs()))


def test_step_rejects_several_tokens() -> None:
    kw = valid_kwargs()
    with pytest.raises(ValueError, match=r"one token per sequence.*got T = 2"):
        ttt_step(**kw | {name: kw[name][:, :2] for name in ("q", "k", "v", "lr")})
    with pytest.raises(ValueError, match=r"cu_seqlens segments must be 0 or 1"):
        ttt_step(**one_row(kw) | {"cu_seqlens": torch.tensor([0, 1, 3, 4, 5, 6])})
