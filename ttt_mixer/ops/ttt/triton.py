"""TTT on Triton kernels: ``ttt_chunk_triton`` and ``ttt_step_triton``, with the arguments, results and
state tuple of ``ttt_chunk`` and ``ttt_step`` (ttt_mixer.ops.ttt.chunk / step).

What runs where:
- Forward (``ttt_chunk_triton``): one fused Triton kernel (``triton_forward``, running the recurrence
  of ``triton_linear`` or ``triton_mlp``), one program per (sequence, head), walking the sequence's
  mini-batches with the inner weights kept on chip: the loss gradients, the dual-form outputs with
  the output LayerNorm and residual, and the weight updates, for TTT-Linear and TTT-MLP, for rows or
  packed sequences (``cu_seqlens``), from a state possibly in the middle of a mini-batch, with
  per-sequence positions.
- Decode (``ttt_step_triton``): the same fused kernel, launched once for a batch of sequences with
  one token (or none) each, at each sequence's own position. Reading one token at position i in the
  forward kernel is exactly the decode recurrence of docs/math.md section 6 (G_i at W; S += lr_i G_i;
  output f(Q_i; W - tau_i S); at i = b, W <- W - tau_b S, S <- 0), so prefill and decode share one
  implementation. A step is bound by moving the state through the chip, which a separate mat-vec
  kernel would do just the same (TTT-MLP needs the whole hidden layer for the loss gradient before
  any update, hence two passes over the weights in both).
- Backward: when gradients are needed, the forward kernel also stores the weights at the start of
  every ``checkpoint_every``-th mini-batch of every sequence (memory O(T / (b checkpoint_every))
  states). The backward walks the segments of ``checkpoint_every`` mini-batches from last to first,
  recomputing each from its stored start weights and back-propagating the output gradient plus the
  gradient reaching the segment's end state, which gives the gradient of its start state for the
  segment before. The first segment starts from the initial state (its position may be
  mid-mini-batch); the gradient of that state becomes the gradient of ``initial_state`` or, without
  one, of ``params``. All of it runs in one fused Triton kernel per (sequence, head), for TTT-Linear
  (``triton_linear_backward``) and TTT-MLP (``triton_mlp_backward``, which streams hidden tiles as
  the forward does); the hand-derived backward of the dual form is in docs/math.md section 14.
  Gradients are exact for every case the forward supports (rows, packed sequences, empty sequences,
  mid-mini-batch states).

The Triton path needs the inner LayerNorm (ln_weight, ln_bias not None). Everything accumulates in
float32 (float64 for float64 inputs), the state is float32 (float64); inputs may be 16-bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
from torch.autograd.function import once_differentiable

from ttt_mixer.ops.ttt.checks import (
    check_checkpoint_every,
    check_decode_step,
    check_inputs,
    check_triton_inputs,
    mini_batch_size_of,
)
from ttt_mixer.ops.ttt.inner import param_shapes, token_scale
from ttt_mixer.ops.ttt.spec import FamilySpec, ttt_spec
from ttt_mixer.ops.ttt.state import State, pack_state, state_position, state_tensors
from ttt_mixer.ops.ttt.state import initial_state as make_initial_state
from ttt_mixer.ops.ttt.triton_backward import BackwardStates, SharedGrads, TokenGrads
from ttt_mixer.ops.ttt.triton_forward import FORWARD_KERNELS
from ttt_mixer.ops.ttt.triton_helpers import (
    DOT_PRECISION,
    INTERPRET,
    TORCH_TO_TRITON,
    Dims,
    Sequences,
    Shared,
    StateBuffers,
    Tokens,
)
from ttt_mixer.ops.ttt.triton_linear_backward import LINEAR_BACKWARD_KERNEL, LINEAR_BACKWARD_META
from ttt_mixer.ops.ttt.triton_mlp_backward import MLP_BACKWARD_KERNEL, MLP_BACKWARD_META

__all__ = ["ttt_chunk_triton", "ttt_step_triton"]

# number of inner layers -> (backward kernel, meta-parameters to pass: none when autotuned)
BACKWARD_KERNELS = {
    1: (LINEAR_BACKWARD_KERNEL, LINEAR_BACKWARD_META),
    2: (MLP_BACKWARD_KERNEL, MLP_BACKWARD_META),
}

Tensors = Sequence[torch.Tensor]


class _Saved(NamedTuple):
    """What the forward saves for the backward: the tensors it read (q, k, v, lr, token_offset,
    ln_weight, ln_bias, *params, *initial state floats) and its checkpoints of the weights."""

    tensors: Tensors
    checkpoints: Tensors


# the gradients w.r.t. the tokens' (q, k, v, lr), the shared (token_offset, ln_weight, ln_bias) and the
# initial state's floating tensors [N, H, ...]
_Gradients = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True)
class _Call:
    """What a call fixes besides its tensors: the spec (TTT-Linear or TTT-MLP), the sequences' layout
    in the flattened [B * T] tokens and their start positions, the mini-batch size, eps and the
    checkpoint spacing."""

    spec: FamilySpec
    seq_start: torch.Tensor  # [N] int64
    seq_len: torch.Tensor  # [N] int64
    position: torch.Tensor  # [N] int64, tokens already read in the current mini-batch
    mini_batch_size: int
    eps: float
    checkpoint_every: int
    has_initial_state: bool

    @property
    def num_layers(self) -> int:
        return self.spec.num_matrices

    @property
    def num_params(self) -> int:
        return 2 * self.num_layers


def ttt_chunk_triton(
    inner_model: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_offset: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    params: Sequence[torch.Tensor],
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    checkpoint_every: int = 4,
) -> tuple[torch.Tensor, State | None]:
    """``ttt_chunk`` on the fused Triton forward kernel (arguments and results as there).

    ln_weight and ln_bias must be tensors. ``checkpoint_every``: when gradients are needed, the
    weights are kept every that many mini-batches, and the backward pass recomputes that many
    mini-batches at a time (memory: T / (b checkpoint_every) states plus one segment's activations).
    """
    check_checkpoint_every(checkpoint_every)
    inputs = (q, k, v, lr, token_offset, ln_weight, ln_bias, params)
    tensors, call = _prepare(inner_model, inputs, initial_state, cu_seqlens, eps, checkpoint_every)
    return _run(call, tensors, output_final_state)


def ttt_step_triton(
    inner_model: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_offset: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    params: Sequence[torch.Tensor],
    initial_state: State | None = None,
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, State | None]:
    """``ttt_step`` on the fused Triton kernel: one token per sequence (T = 1 for a batch of rows), or,
    packed, ``cu_seqlens`` whose sequences hold one token or none (a sequence without a token keeps
    its state). ln_weight and ln_bias must be tensors."""
    inputs = (q, k, v, lr, token_offset, ln_weight, ln_bias, params)
    # a step touches one mini-batch: the backward is a single segment
    tensors, call = _prepare(inner_model, inputs, initial_state, cu_seqlens, eps, checkpoint_every=1)
    check_decode_step(q, cu_seqlens)
    return _run(call, tensors, output_final_state)


def _prepare(
    inner_model: str,
    inputs: tuple,
    initial_state: State | None,
    cu_seqlens: torch.Tensor | None,
    eps: float,
    checkpoint_every: int,
) -> tuple[Tensors, _Call]:
    """Validate the inputs (q, k, v, lr, token_offset, ln_weight, ln_bias, params) and lay the
    sequences out (see ``_Call``). Returns the tensors the kernels read, (q, k, v, lr, token_offset,
    ln_weight, ln_bias, *params, *the initial state's floating tensors), and the call."""
    q, lr, token_offset, ln_weight, ln_bias, params = inputs[0], *inputs[3:7], list(inputs[7])
    spec = ttt_spec(inner_model, mini_batch_size_of(token_offset))
    num_sequences = check_inputs(spec, *inputs[:7], params, None, None, initial_state, cu_seqlens, eps)
    check_triton_inputs(q, lr, ln_weight, ln_bias, INTERPRET)
    B, T = q.shape[:2]
    device = q.device
    if cu_seqlens is None:
        seq_start = torch.arange(B, device=device, dtype=torch.long) * T
        seq_len = torch.full((B,), T, device=device, dtype=torch.long)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        seq_start, seq_len = cu[:-1].contiguous(), (cu[1:] - cu[:-1]).contiguous()
    if initial_state is None:
        position = torch.zeros(num_sequences, device=device, dtype=torch.long)
        state_floats = []
    else:
        position = state_position(initial_state).to(device=device, dtype=torch.long).contiguous()
        state_floats = list(state_tensors(initial_state))
    call = _Call(
        spec=spec,
        seq_start=seq_start,
        seq_len=seq_len,
        position=position,
        mini_batch_size=spec.mini_batch_size,
        eps=float(eps),
        checkpoint_every=checkpoint_every,
        has_initial_state=initial_state is not None,
    )
    return (*inputs[:7], *params, *state_floats), call


def _run(call: _Call, tensors: Tensors, output_final_state: bool) -> tuple[torch.Tensor, State | None]:
    """The forward kernel, through the autograd function when a gradient is needed."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        o, *final = _TTTTriton.apply(call, *tensors)
    else:
        o, final, _ = _forward(call, *tensors, store_checkpoints=False)
    if not output_final_state:
        return o, None
    final_position = (call.position + call.seq_len) % call.mini_batch_size
    num_weights = call.num_params
    return o, pack_state(final_position, final[:num_weights], final[num_weights:])


def _forward(
    call: _Call, *tensors: torch.Tensor, store_checkpoints: bool
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run the forward kernel on (q, k, v, lr, token_offset, ln_weight, ln_bias, *params, *state floats)
    over the call's N sequences.

    Returns the outputs (dtype of q), the final state's floating tensors (W1, b1, [W2, b2,] S_W1, S_b1,
    [S_W2, S_b2]) [N, H, ...] in the compute dtype (float32 or float64), and, with store_checkpoints,
    the weights (W1, b1, [W2, b2]) [num_checkpoints, N, H, ...] at the start of mini-batches
    checkpoint_every, 2 checkpoint_every, ... of each sequence (none when one segment covers them).
    """
    q, token_offset, ln_weight, ln_bias = tensors[0], *tensors[4:7]
    state = _initial_floats(call, tensors)
    weights, sums = state[: call.num_params], state[call.num_params :]
    tokens = _tokens(tensors)
    o = torch.empty_like(tokens.q)
    # the MLP kernel writes the output accumulators only where they end non-zero
    final = [torch.empty_like(t) for t in weights] + [torch.zeros_like(t) for t in sums]
    num_checkpoints = _num_segments(call) - 1 if store_checkpoints else 0
    checkpoints = (
        [t.new_empty(num_checkpoints, *t.shape) for t in weights]
        if num_checkpoints > 0
        else final[: call.num_params]  # placeholders, never written
    )
    kernel, meta = FORWARD_KERNELS[call.num_layers]
    kernel[_grid(call, q)](
        tokens,
        o,
        _shared(call, token_scale(token_offset.to(state[0].dtype)), ln_weight, ln_bias),
        _sequences(call),
        StateBuffers(tuple(state), tuple(final), tuple(checkpoints)),
        _dims(call, q),
        NUM_LAYERS=call.num_layers,
        STORE_CHECKPOINTS=num_checkpoints > 0,
        **_block_meta(call, q),
        **meta,
    )
    return o, final, checkpoints if num_checkpoints > 0 else []


# What both kernels (forward and backward) take, from a call and its tensors ---------------------------


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit and float32 inputs, float64 for float64."""
    return torch.promote_types(q.dtype, torch.float32)


def _initial_floats(call: _Call, tensors: Tensors) -> list[torch.Tensor]:
    """The initial state's floating tensors [N, H, ...] in the compute dtype, contiguous: the given
    state's, or the params broadcast to every sequence with zero accumulators."""
    compute = _compute_dtype(tensors[0])
    params, state_floats = tensors[7 : 7 + call.num_params], tensors[7 + call.num_params :]
    if not call.has_initial_state:
        num_sequences = call.seq_start.shape[0]
        state_floats = state_tensors(
            make_initial_state(call.spec, [p.to(compute) for p in params], num_sequences)
        )
    return [t.detach().to(compute).contiguous() for t in state_floats]


def _tokens(tensors: Tensors) -> Tokens:
    return Tokens(*(t.detach().contiguous() for t in tensors[:4]))


def _shared(call: _Call, tau: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor) -> Shared:
    tensors = (t.detach().contiguous() for t in (tau, ln_weight, ln_bias))
    return Shared(*tensors, call.eps)


def _sequences(call: _Call) -> Sequences:
    return Sequences(call.seq_start, call.seq_len, call.position)


def _grid(call: _Call, q: torch.Tensor) -> tuple[int, int]:
    """One program per (sequence, head)."""
    return call.seq_start.shape[0], q.shape[2]


def _dims(call: _Call, q: torch.Tensor) -> Dims:
    d = q.shape[3]
    hidden = param_shapes(call.spec, 1, d)[0][2]
    return Dims(d, hidden, call.mini_batch_size, call.checkpoint_every)


def _block_meta(call: _Call, q: torch.Tensor) -> dict:
    """The block sizes, compute dtype and dot precision of a launch (see ``triton_helpers``)."""
    return {
        "BLOCK_T": max(16, triton.next_power_of_2(call.mini_batch_size)),
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[3])),
        "COMPUTE": TORCH_TO_TRITON[_compute_dtype(q)],
        "PRECISION": DOT_PRECISION[q.dtype],
    }


def _num_segments(call: _Call) -> int:
    """Segments of checkpoint_every mini-batches needed to cover the longest sequence (at least 1)."""
    b = call.mini_batch_size
    num_minibatches = int(((call.position + call.seq_len + b - 1) // b).max())
    span = call.checkpoint_every
    return max(1, -(-num_minibatches // span))


class _TTTTriton(torch.autograd.Function):
    """Forward on the Triton kernel with weight checkpoints; backward segment by segment from them."""

    @staticmethod
    def forward(ctx, call: _Call, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        o, final, checkpoints = _forward(call, *tensors, store_checkpoints=True)
        ctx.call = call
        ctx.num_inputs = len(tensors)
        ctx.save_for_backward(*tensors, *checkpoints)
        return (o, *final)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_o: torch.Tensor, *grad_final: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        saved = _Saved(saved[: ctx.num_inputs], saved[ctx.num_inputs :])
        grads = _backward(ctx.call, saved, [grad_o, *grad_final])
        grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[1:], strict=True)]
        return (None, *grads)


def _backward(call: _Call, saved: _Saved, grads: Tensors) -> list[torch.Tensor | None]:
    """Gradients w.r.t. (q, k, v, lr, token_offset, ln_weight, ln_bias, *params, *state floats) from
    those of (o, *final state floats), by the fused backward kernel of the inner model."""
    tensors = saved.tensors
    compute = _compute_dtype(tensors[0])
    grads = [grads[0].contiguous(), *(g.to(compute).contiguous() for g in grads[1:])]
    grad_tokens, grad_shared, grad_state = _fused_backward(call, saved, grads)
    q, k, v, lr, token_offset, ln_weight, ln_bias = tensors[:7]
    params, state_floats = tensors[7 : 7 + call.num_params], tensors[7 + call.num_params :]
    grad_tokens = [g.reshape(t.shape).to(t.dtype) for g, t in zip(grad_tokens, (q, k, v, lr), strict=True)]
    grad_shared = [
        g.to(t.dtype) for g, t in zip(grad_shared, (token_offset, ln_weight, ln_bias), strict=True)
    ]
    if call.has_initial_state:
        grad_params = [None] * call.num_params
        grad_initial = [g.to(t.dtype) for g, t in zip(grad_state, state_floats, strict=True)]
    else:
        # every sequence starts from the params: their gradient sums over sequences
        grad_params = [
            g.sum(0).to(p.dtype) for g, p in zip(grad_state[: call.num_params], params, strict=True)
        ]
        grad_initial = []
    return [*grad_tokens, *grad_shared, *grad_params, *grad_initial]


def _fused_backward(call: _Call, saved: _Saved, grads: Tensors) -> _Gradients:
    """The gradients from the fused backward kernel (``triton_linear_backward`` or
    ``triton_mlp_backward``), the tokens' flattened to [B * T, ...]."""
    tensors, checkpoints = saved
    q, token_offset, ln_weight, ln_bias = tensors[0], *tensors[4:7]
    num_sequences, num_heads = _grid(call, q)
    initial = _initial_floats(call, tensors)
    compute = initial[0].dtype
    offset = token_offset.detach().to(compute).requires_grad_()
    with torch.enable_grad():
        tau = token_scale(offset)
    tokens = _tokens(tensors)
    token_grads = TokenGrads(grads[0], *(torch.empty_like(t) for t in tokens))
    shared_grads = SharedGrads(
        initial[0].new_empty(num_sequences, num_heads, call.mini_batch_size),
        initial[0].new_empty(num_sequences, num_heads, q.shape[3]),
        initial[0].new_empty(num_sequences, num_heads, q.shape[3]),
    )
    weights = initial[: call.num_params]
    states = BackwardStates(
        tuple(initial),
        tuple(checkpoints) if checkpoints else tuple(weights),  # placeholders when never read
        _scratch(call, weights),
    )
    grad_initial = [torch.empty_like(t) for t in initial]
    kernel, meta = BACKWARD_KERNELS[call.num_layers]
    kernel[_grid(call, q)](
        tokens,
        token_grads,
        _shared(call, tau, ln_weight, ln_bias),
        shared_grads,
        _sequences(call),
        states,
        tuple(grads[1:]),
        tuple(grad_initial),
        _dims(call, q),
        **_block_meta(call, q),
        **meta,
    )
    (grad_offset,) = torch.autograd.grad(tau, offset, shared_grads.tau.sum((0, 1)))
    grad_shared = [grad_offset, shared_grads.ln_weight.sum(0), shared_grads.ln_bias.sum(0)]
    return list(token_grads[1:]), grad_shared, grad_initial


def _scratch(call: _Call, weights: Tensors) -> tuple[torch.Tensor, ...]:
    """The backward kernel's scratch: the weights [checkpoint_every, N, H, ...] of one segment's
    mini-batches, and for TTT-MLP the part of the keys' hidden gradient dZ1 [N, H, b, 4d] that one
    pass leaves for the next."""
    scratch = tuple(w.new_empty(call.checkpoint_every, *w.shape) for w in weights)
    if call.num_layers == 1:
        return scratch
    num_sequences, num_heads, hidden = weights[1].shape
    return (*scratch, weights[1].new_empty(num_sequences, num_heads, call.mini_batch_size, hidden))
