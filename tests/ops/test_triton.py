"""Tests of the Triton TTT kernels (``ttt_mixer.ops.ttt.triton``) against the PyTorch paths: the
forward kernel and the decode step against the primal form ``ttt_primal`` (outputs, final states and
every gradient), at several shapes (T < b, T not a multiple of b, b and d not powers of two, d up to
64, several heads), from states in the middle of a mini-batch at different positions per sequence,
for packed sequences (short and empty ones included), chained decoding and continuation.

Without a GPU the kernels run in Triton's interpreter, in float32 (and float64); on a GPU the same
tests run natively, plus 16-bit inputs against a float32 run (docs/conventions.md section 6).
"""

# Without a GPU the kernels run in Triton's interpreter: tests/conftest.py chooses it for the whole
# session, before anything imports Triton (fla, imported by ttt_mixer, does).
from collections.abc import Sequence

import pytest
import torch
from ops_cases import (
    PARAM_NAMES,
    TOLERANCE,
    Op,
    State,
    TTTInputs,
    assert_matches,
    detach_state,
    make_inputs,
    make_state,
    max_abs_diff,
    output_and_state_loss,
    run,
)

from ttt_mixer.ops import INNER_MODELS, ttt_chunk, ttt_chunk_triton, ttt_primal, ttt_step, ttt_step_triton

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
HALF_PRECISION_RMS = 5e-3
# docs/conventions.md section 6: float64 gradients agree with the primal form's to 1e-9
TOLERANCE_FLOAT64_GRADIENTS = 1e-9

inner_models = pytest.mark.parametrize("inner_model", INNER_MODELS)


# Helpers -------------------------------------------------------------------------------------------


def make_case(
    inner_model: str,
    batch_size: int,
    seq_len: int,
    mini_batch_size: int,
    head_dim: int = 16,
    num_heads: int = 2,
    positions: Sequence[int] | None = None,
    lengths: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[TTTInputs, State | None, torch.Tensor | None]:
    """Seeded inputs on DEVICE, an initial state with the given per-sequence positions (None without),
    and cu_seqlens when ``lengths`` packs the first lengths[n] tokens of row n."""
    inputs = make_inputs(
        inner_model, batch_size, seq_len, num_heads, head_dim, mini_batch_size, dtype=dtype, seed=seed
    )
    cu_seqlens = None
    if lengths is not None:
        inputs, cu_seqlens = inputs.packed(lengths)
        cu_seqlens = cu_seqlens.to(DEVICE)
    inputs = inputs.with_tensors({name: t.to(DEVICE) for name, t in inputs.float_tensors().items()})
    state = None
    if positions is not None:
        # states are float32 (float64 for float64 inputs), whatever the inputs
        state_dtype = torch.promote_types(dtype, torch.float32)
        state = make_state(inner_model, positions, num_heads, head_dim, dtype=state_dtype, seed=seed + 1)
        state = tuple(t.to(DEVICE) for t in state)
    return inputs, state, cu_seqlens


def gradients(
    op: Op, inputs: TTTInputs, state: State | None, cu_seqlens: torch.Tensor | None = None, **kwargs
) -> tuple[torch.Tensor, State, dict[str, torch.Tensor]]:
    """Outputs, final state, and the gradients of ``output_and_state_loss`` w.r.t. every floating input
    and initial-state tensor (zeros for one the op does not read, like the params given a state)."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.float_tensors().items()}
    given = inputs.with_tensors(leaves)
    if state is not None:
        state = detach_state(state, requires_grad=True)
        leaves |= {f"initial_state[{i}]": t for i, t in enumerate(state) if t.is_floating_point()}
    o, final = run(op, given, state, cu_seqlens, **kwargs)
    grads = torch.autograd.grad(output_and_state_loss(o, final), list(leaves.values()), allow_unused=True)
    grads = {
        name: torch.zeros_like(t) if g is None else g
        for (name, t), g in zip(leaves.items(), grads, strict=True)
    }
    return o.detach(), detach_state(final), grads


def assert_gradients_match(
    grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float
) -> None:
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        # as if the loss were scaled to make each gradient at most of order one (the gradients
        # w.r.t. a state's MLP biases reach a few hundred)
        scale = max(1.0, expected[name].abs().max().item())
        diff = max_abs_diff(grad, expected[name]) / scale
        assert diff <= tol, f"d loss / d {name} differs by {diff:.3g} (scaled by 1/{scale:.3g})"


def relative_rms(x: torch.Tensor, reference: torch.Tensor) -> float:
    x, reference = x.double(), reference.double()
    return ((x - reference).norm() / reference.norm().clamp_min(1e-30)).item()


# Forward against the primal form -------------------------------------------------------------------

# name -> make_case keyword arguments
FORWARD_CASES = {
    "T<b": {"batch_size": 2, "seq_len": 3, "mini_batch_size": 4},
    "T%b!=0": {"batch_size": 2, "seq_len": 10, "mini_batch_size": 4},
    "b=5-d=24-H=3": {"batch_size": 2, "seq_len": 11, "mini_batch_size": 5, "head_dim": 24, "num_heads": 3},
    "d=32": {"batch_size": 1, "seq_len": 6, "mini_batch_size": 4, "head_dim": 32},
    "d=64": {"batch_size": 1, "seq_len": 3, "mini_batch_size": 2, "head_dim": 64},
    "mid-mini-batch-state": {"batch_size": 2, "seq_len": 9, "mini_batch_size": 4, "positions": (1, 3)},
    "b=16-mid-mini-batch-state": {
        "batch_size": 2,
        "seq_len": 20,
        "mini_batch_size": 16,
        "positions": (15, 3),
    },
    "packed": {"batch_size": 4, "seq_len": 9, "mini_batch_size": 4, "lengths": (6, 1, 0, 9)},
    "packed-mid-mini-batch-state": {
        "batch_size": 4,
        "seq_len": 9,
        "mini_batch_size": 4,
        "lengths": (6, 1, 0, 9),
        "positions": (2, 3, 1, 0),
    },
}


@inner_models
@pytest.mark.parametrize("case", FORWARD_CASES.values(), ids=FORWARD_CASES.keys())
def test_forward_matches_primal(inner_model: str, case: dict) -> None:
    inputs, state, cu_seqlens = make_case(inner_model, **case, seed=len(case))
    expected = run(ttt_primal, inputs, state, cu_seqlens)
    assert_matches(run(ttt_chunk_triton, inputs, state, cu_seqlens), expected, TOLERANCE[torch.float32])


@inner_models
def test_forward_float64_matches_primal(inner_model: str) -> None:
    inputs, state, _ = make_case(inner_model, 2, 7, 4, positions=(3, 1), dtype=torch.float64, seed=3)
    o, final = run(ttt_chunk_triton, inputs, state)
    assert o.dtype == torch.float64 and all(t.dtype == torch.float64 for t in final[1:])
    assert_matches((o, final), run(ttt_primal, inputs, state), TOLERANCE[torch.float64])


@inner_models
def test_final_state_only_on_request(inner_model: str) -> None:
    inputs, _, _ = make_case(inner_model, 1, 5, 4, seed=4)
    o, final = ttt_chunk_triton(*inputs.args())
    assert final is None
    assert max_abs_diff(o, ttt_chunk(*inputs.args())[0]) <= TOLERANCE[torch.float32]


@inner_models
def test_continuation_matches_one_pass(inner_model: str) -> None:
    """A prefill that stops mid-mini-batch, then two continuation chunks, equal one pass."""
    inputs, _, _ = make_case(inner_model, 2, 13, 4, seed=5)
    outputs, state = [], None
    for start, end in ((0, 5), (5, 6), (6, 13)):
        o, state = run(ttt_chunk_triton, inputs.tokens(start, end), state)
        outputs.append(o)
    assert_matches((torch.cat(outputs, dim=1), state), run(ttt_primal, inputs), TOLERANCE[torch.float32])


# Decode step ----------------------------------------------------------------------------------------


@inner_models
def test_step_chain_matches_forward(inner_model: str) -> None:
    """Token-by-token decoding from a mid-mini-batch state, sequences at different positions, gives
    the forward kernel's outputs and final state (and the primal form's)."""
    inputs, state, _ = make_case(inner_model, 2, 6, 4, positions=(2, 0), seed=6)
    outputs, step_state = [], state
    for t in range(inputs.seq_len):
        o, step_state = ttt_step_triton(*inputs.tokens(t, t + 1).args(), initial_state=step_state)
        outputs.append(o)
    chained = (torch.cat(outputs, dim=1), step_state)
    tol = TOLERANCE[torch.float32]
    assert_matches(chained, run(ttt_chunk_triton, inputs, state), tol)
    assert_matches(chained, run(ttt_primal, inputs, state), tol)


@inner_models
def test_step_packed_matches_step(inner_model: str) -> None:
    """Packed decoding where some sequences have no token: those keep their state."""
    inputs, state, cu_seqlens = make_case(
        inner_model, 4, 1, 4, positions=(3, 1, 0, 2), lengths=(1, 0, 1, 0), seed=7
    )
    got = ttt_step_triton(*inputs.args(), initial_state=state, cu_seqlens=cu_seqlens)
    assert_matches(
        got, ttt_step(*inputs.args(), initial_state=state, cu_seqlens=cu_seqlens), TOLERANCE[torch.float32]
    )


# Gradients ------------------------------------------------------------------------------------------

# name -> (make_case keyword arguments, checkpoint_every); checkpoint_every=1 recomputes one mini-batch
# per backward segment, so these cross several segment boundaries (the fused backward kernel of each
# inner model replays each segment in the kernel)
GRADIENT_CASES = {
    "rows": ({"batch_size": 2, "seq_len": 10, "mini_batch_size": 4}, 1),
    "one-segment": ({"batch_size": 2, "seq_len": 10, "mini_batch_size": 4}, 4),
    "T<b": ({"batch_size": 2, "seq_len": 3, "mini_batch_size": 4}, 1),
    "d=32-H=3-segments-of-3": (
        {"batch_size": 1, "seq_len": 14, "mini_batch_size": 3, "head_dim": 32, "num_heads": 3},
        3,
    ),
    "d=64-mid-mini-batch-state": (
        {"batch_size": 2, "seq_len": 6, "mini_batch_size": 4, "head_dim": 64, "positions": (3, 1)},
        1,
    ),
    "mid-mini-batch-state": ({"batch_size": 2, "seq_len": 10, "mini_batch_size": 4, "positions": (1, 3)}, 2),
    # sequence 0 ends with a complete mini-batch where a segment would start: no checkpoint past the end
    "ends-on-segment-boundary": (
        {"batch_size": 2, "seq_len": 13, "mini_batch_size": 4, "positions": (3, 0)},
        2,
    ),
    "packed-mid-mini-batch-state": (
        {"batch_size": 3, "seq_len": 9, "mini_batch_size": 3, "lengths": (5, 0, 9), "positions": (2, 0, 1)},
        1,
    ),
    "packed-segments-of-3": (
        {"batch_size": 3, "seq_len": 13, "mini_batch_size": 2, "lengths": (13, 4, 1), "positions": (1, 0, 1)},
        3,
    ),
}


def as_float64(inputs: TTTInputs, state: State | None) -> tuple[TTTInputs, State | None]:
    """The same numbers in float64: the reference the float32 kernels are held to."""
    wide = inputs.with_tensors({name: t.double() for name, t in inputs.float_tensors().items()})
    if state is None:
        return wide, None
    return wide, tuple(t.double() if t.is_floating_point() else t for t in state)


@inner_models
@pytest.mark.parametrize("case", GRADIENT_CASES.values(), ids=GRADIENT_CASES.keys())
def test_gradients_match_primal(inner_model: str, case: tuple[dict, int]) -> None:
    """Outputs, final state and every gradient against the primal form in float64."""
    shape, checkpoint_every = case
    inputs, state, cu_seqlens = make_case(inner_model, **shape, seed=8)
    o, final, grads = gradients(
        ttt_chunk_triton, inputs, state, cu_seqlens, checkpoint_every=checkpoint_every
    )
    o_ref, final_ref, grads_ref = gradients(ttt_primal, *as_float64(inputs, state), cu_seqlens)
    tol = TOLERANCE[torch.float32]
    assert_matches((o.double(), final), (o_ref, final_ref), tol)
    assert_gradients_match(grads, grads_ref, tol)
    # every tensor that is read gets a gradient: the params only when no state is given
    read = {name for name in grads if state is None or name not in PARAM_NAMES}
    assert {name for name, g in grads.items() if g.abs().max() > 0} == read


@inner_models
def test_gradients_float64_match_primal(inner_model: str) -> None:
    """The fused backward in float64 agrees with the primal form to rounding: the hand-derived
    gradients (docs/math.md section 14) are exact, packed, from mid-mini-batch states, across
    segments."""
    shape, checkpoint_every = GRADIENT_CASES["packed-mid-mini-batch-state"]
    inputs, state, cu_seqlens = make_case(inner_model, **shape, dtype=torch.float64, seed=14)
    _, _, grads = gradients(ttt_chunk_triton, inputs, state, cu_seqlens, checkpoint_every=checkpoint_every)
    _, _, grads_ref = gradients(ttt_primal, inputs, state, cu_seqlens)
    assert all(g.dtype == torch.float64 for g in grads.values())
    assert_gradients_match(grads, grads_ref, TOLERANCE_FLOAT64_GRADIENTS)


@inner_models
def test_step_gradients_match_step(inner_model: str) -> None:
    inputs, state, _ = make_case(inner_model, 2, 1, 4, positions=(3, 1), seed=9)
    _, _, grads = gradients(ttt_step_triton, inputs, state)
    _, _, grads_ref = gradients(ttt_step, inputs, state)
    assert_gradients_match(grads, grads_ref, TOLERANCE[torch.float32])


# Input checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [ttt_chunk_triton, ttt_step_triton], ids=["chunk", "step"])
def test_requires_layer_norm(op: Op) -> None:
    inputs, _, _ = make_case("linear", 1, 1, 4, seed=10)
    args = list(inputs.args())
    args[6:8] = None, None
    with pytest.raises(ValueError, match="ln_weight and ln_bias must be tensors"):
        op(*args)


def test_step_rejects_several_tokens() -> None:
    inputs, _, cu_seqlens = make_case("linear", 2, 2, 4, lengths=(1, 2), seed=11)
    with pytest.raises(ValueError, match="at most one token per sequence"):
        ttt_step_triton(*inputs.args(), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="one token per sequence"):
        ttt_step_triton(*make_case("linear", 1, 2, 4)[0].args())


def test_rejects_bad_checkpoint_every() -> None:
    inputs, _, _ = make_case("linear", 1, 2, 4, seed=12)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        ttt_chunk_triton(*inputs.args(), checkpoint_every=0)


# Half precision on a GPU ------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="16-bit Triton kernels are tested on a GPU only")
@inner_models
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_matches_float32_run(inner_model: str, dtype: torch.dtype) -> None:
    """16-bit inputs against a float32 run on the same (rounded) inputs: outputs, final state and
    gradients within a relative RMS error of 5e-3."""
    shape = {"batch_size": 2, "seq_len": 45, "mini_batch_size": 16, "head_dim": 64, "num_heads": 4}
    inputs, state, _ = make_case(inner_model, **shape, positions=(5, 0), dtype=dtype, seed=13)
    wide = inputs.with_tensors({name: t.float() for name, t in inputs.float_tensors().items()})
    o, final, grads = gradients(ttt_chunk_triton, inputs, state)
    o_ref, final_ref, grads_ref = gradients(ttt_chunk_triton, wide, state)
    assert o.dtype == dtype and all(t.dtype == torch.float32 for t in final[1:])
    assert relative_rms(o, o_ref) <= HALF_PRECISION_RMS
    for t, t_ref in zip(final[1:], final_ref[1:], strict=True):
        assert relative_rms(t, t_ref) <= HALF_PRECISION_RMS
    for name, grad in grads.items():
        assert relative_rms(grad, grads_ref[name]) <= HALF_PRECISION_RMS, name
