"""The fused Triton backward kernel of TTT-Linear, one program per (sequence, head) (the derivation of
every gradient: docs/math.md section 14).

A program walks its sequence's segments of ``checkpoint_every`` mini-batches from last to first. For
each segment it first replays the forward from the segment's start weights (the initial state for the
first segment, which may start in the middle of a mini-batch; a checkpoint of the forward kernel for
the others), keeping the weights (W, b) at the start of every mini-batch of the segment in a scratch
buffer in global memory; then it walks the segment's mini-batches in reverse, recomputing each one's
loss gradient and dual form from its start weights and back-propagating through them. The gradient
of the state after a mini-batch (dW, db, dS_W, dS_b) stays in registers from one mini-batch to the one
before it, starting from the gradient of the final state; what is left at the end is the gradient of
the initial state.

Written per program: the gradients of q, k, v and lr of its tokens (each token belongs to one
program), the gradient of its initial state, and its own partial sums of the gradients w.r.t. the
token scale tau and the inner LayerNorm's weight and bias, which ``ttt_mixer.ops.ttt.triton`` sums
over the programs (and carries from tau to token_offset).

TTT-MLP has no fused backward yet: its backward recomputes the segments with ``ttt_chunk`` in
PyTorch (``ttt_mixer.ops.ttt.triton``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ttt_mixer.ops.ttt.triton_helpers import (
    causal,
    dual_form_finish,
    dual_form_partial,
    ln_fused_l2_grad_backward,
    ln_fused_l2_parts,
    load_minibatch,
    mask_if,
    normalize,
    normalize_backward,
    program_setup,
    tuned,
    vector_tile,
)
from ttt_mixer.ops.ttt.triton_linear import (
    linear_advance,
    linear_loss_grad,
    linear_tiles,
    load_linear_state,
    store_linear_state,
)

LINEAR_BACKWARD_CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8)]


class TokenGrads(NamedTuple):
    """Per-token gradients, contiguous like ``Tokens``: o, the gradient of the outputs, is read; the
    gradients of q, k, v and lr are written."""

    o: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lr: torch.Tensor


class SharedGrads(NamedTuple):
    """Each program's own share of the gradients of ``Shared``'s tensors, written: tau [N, H, b],
    ln_weight and ln_bias [N, H, d]."""

    tau: torch.Tensor
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor


class BackwardStates(NamedTuple):
    """The weights the backward replays from, each a tuple of pointers: initial (W, b, S_W, S_b)
    [N, H, ...], the forward's checkpoints (W, b) [num_checkpoints, N, H, ...] and the scratch (W, b)
    [checkpoint_every, N, H, ...] that holds the start weights of the mini-batches of one segment."""

    initial: tuple
    checkpoints: tuple
    scratch: tuple


@triton.jit
def _slot_load(ptr, tile, slot, condition):
    """The tile in slot ``slot`` of a checkpoint-like [slots, N, H, ...] tensor where the scalar
    condition holds, else zeros."""
    return tl.load(
        ptr + slot * tile.slot_stride + tile.offsets, mask=mask_if(tile.mask, condition), other=0.0
    )


@triton.jit
def _slot_store(ptr, tile, slot, value):
    """The inverse of ``_slot_load``."""
    tl.store(ptr + slot * tile.slot_stride + tile.offsets, value, mask=tile.mask)


@triton.jit
def _replay_segment(tokens, program, states, tiles, first, end, dims, BLOCK_T, BLOCK_D, COMPUTE, PRECISION):
    """Run the forward's state recurrence over mini-batches first .. end - 1, storing the weights that
    start each one in the scratch slot index - first."""
    w_tile, b_tile = tiles
    w_in, b_in, sw_in, sb_in = states.initial
    w_ckpt, b_ckpt = states.checkpoints
    w_scratch, b_scratch = states.scratch
    at_start = first == 0
    slot = tl.maximum(first // dims.checkpoint_every - 1, 0)
    # the first segment starts from the initial state, every other one from a checkpoint (S = 0)
    state = (
        _slot_load(w_in, w_tile, 0, at_start) + _slot_load(w_ckpt, w_tile, slot, first > 0),
        _slot_load(b_in, b_tile, 0, at_start) + _slot_load(b_ckpt, b_tile, slot, first > 0),
        _slot_load(sw_in, w_tile, 0, at_start),
        _slot_load(sb_in, b_tile, 0, at_start),
    )
    for index in range(first, end):
        _slot_store(w_scratch, w_tile, index - first, state[0])
        _slot_store(b_scratch, b_tile, index - first, state[1])
        minibatch = load_minibatch(tokens, program, index, dims, BLOCK_T, BLOCK_D, COMPUTE)
        grad = linear_loss_grad(minibatch, program, state[0], state[1], dims, BLOCK_D, PRECISION)
        state = linear_advance(minibatch, program, state, grad, PRECISION)


@triton.jit
def _update_backward(minibatch, program, k, grad, sums, grad_end, PRECISION: tl.constexpr):
    """Back through S_end = S + K^T (lr g) and the weight update at the mini-batch's end: returns the
    gradients w.r.t. S_end (W's and b's) and tau_b, and the gradient w.r.t. lr g."""
    sum_w, sum_b = sums
    d_weight_end, d_bias_end, d_sum_w_after, d_sum_b_after = grad_end
    complete = minibatch.complete
    grad_lr = grad * minibatch.lr[:, None]
    sum_w_end = sum_w + tl.dot(tl.trans(k), grad_lr, input_precision=PRECISION)
    sum_b_end = sum_b + tl.sum(grad_lr, axis=0)
    # complete: W <- W - tau_b S_end and S <- 0 (a constant); else S_end is the state's S
    d_sum_w_end = tl.where(complete, -program.tau_last * d_weight_end, d_sum_w_after)
    d_sum_b_end = tl.where(complete, -program.tau_last * d_bias_end, d_sum_b_after)
    d_tau_last = -tl.sum(tl.sum(sum_w_end * d_weight_end, axis=1), axis=0) - tl.sum(
        sum_b_end * d_bias_end, axis=0
    )
    d_tau_last = tl.where(complete, d_tau_last, 0.0)
    d_grad_lr = tl.dot(k, d_sum_w_end, input_precision=PRECISION) + d_sum_b_end[None, :]
    return d_sum_w_end, d_sum_b_end, d_tau_last, grad_lr, d_grad_lr


@triton.jit
def _linear_minibatch_backward(
    minibatch, program, weights, sums, grad_end, token_grads, dims, BLOCK_T, BLOCK_D, PRECISION
):
    """One mini-batch of TTT-Linear backward: from its start weights (W, b), its start sums (S_W, S_b;
    zero unless it is the call's first) and the gradient of the state after it, writes the gradients
    of its tokens' q, k, v, lr and returns the gradient of the state before it, and the mini-batch's
    shares of the gradients w.r.t. tau [BLOCK_T], ln_weight and ln_bias [BLOCK_D]."""
    weight, bias = weights
    sum_w, sum_b = sums
    q, k = minibatch.q, minibatch.k
    col_valid = tl.arange(0, BLOCK_D) < dims.head_dim
    cells = tl.arange(0, BLOCK_T)

    # recompute the forward of the mini-batch
    z_key = tl.dot(k, weight, input_precision=PRECISION) + bias[None, :]
    z_hat_key, rstd_key, error = ln_fused_l2_parts(z_key, minibatch.v - k, program, dims, BLOCK_D)
    grad = normalize_backward(
        error * program.ln_weight[None, :], z_hat_key, rstd_key, col_valid, dims.head_dim
    )
    grad = tl.where(minibatch.real[:, None], grad, 0.0)
    z_query = dual_form_partial(q, weight, sum_w, program, minibatch, PRECISION)
    query_key = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    z_query = dual_form_finish(z_query, query_key, grad, bias, sum_b, program, minibatch, PRECISION)
    z_hat_query, rstd_query = normalize(z_query, col_valid, dims.head_dim, program.eps)

    # o = q + LN(Zbar)
    d_o = tl.load(token_grads.o + minibatch.tile, mask=minibatch.mask, other=0.0).to(z_query.dtype)
    d_ln_weight = tl.sum(d_o * z_hat_query, axis=0)
    d_ln_bias = tl.sum(d_o, axis=0)
    d_z_query = normalize_backward(
        d_o * program.ln_weight[None, :], z_hat_query, rstd_query, col_valid, dims.head_dim
    )

    # the accumulated sums and the update at the end
    d_sum_w, d_sum_b, d_tau_last, grad_lr, d_grad_lr = _update_backward(
        minibatch, program, k, grad, sums, grad_end, PRECISION
    )
    d_k = tl.dot(grad_lr, tl.trans(d_sum_w), input_precision=PRECISION)
    d_lr = tl.sum(grad * d_grad_lr, axis=1)
    d_grad = minibatch.lr[:, None] * d_grad_lr

    # Zbar = Q W + b - tau (Q S_W + S_b) - (eta * (Q K^T + 1)) g
    scores = (query_key + 1.0) * minibatch.eta
    d_grad -= tl.dot(tl.trans(scores), d_z_query, input_precision=PRECISION)
    d_scores = tl.where(causal(BLOCK_T), -tl.dot(d_z_query, tl.trans(grad), input_precision=PRECISION), 0.0)
    d_eta = d_scores * (query_key + 1.0)
    d_query_key = d_scores * minibatch.eta
    d_q = d_o + tl.dot(d_z_query, tl.trans(weight), input_precision=PRECISION)
    d_q += tl.dot(d_query_key, k, input_precision=PRECISION)
    d_k += tl.dot(tl.trans(d_query_key), q, input_precision=PRECISION)
    d_tau = tl.sum(d_eta * minibatch.lr[None, :], axis=1)
    d_lr += tl.sum(d_eta * program.tau_rows[:, None], axis=0)
    d_weight = grad_end[0] + tl.dot(tl.trans(q), d_z_query, input_precision=PRECISION)
    d_bias = grad_end[1] + tl.sum(d_z_query, axis=0)
    if minibatch.first:
        tau_d_z_query = program.tau_rows[:, None] * d_z_query
        d_q -= tl.dot(tau_d_z_query, tl.trans(sum_w), input_precision=PRECISION)
        d_sum_w -= tl.dot(tl.trans(q), tau_d_z_query, input_precision=PRECISION)
        d_sum_b -= tl.sum(tau_d_z_query, axis=0)
        query_sums = tl.dot(q, sum_w, input_precision=PRECISION) + sum_b[None, :]
        d_tau -= tl.sum(d_z_query * query_sums, axis=1)
    d_tau += tl.where(cells == dims.mini_batch_size - 1, d_tau_last, 0.0)

    # g = dl/dZ at Z = K W + b, target V - K
    d_grad = tl.where(minibatch.real[:, None], d_grad, 0.0)
    d_z_key, d_target, d_ln_weight_key, d_ln_bias_key = ln_fused_l2_grad_backward(
        d_grad, grad, z_hat_key, rstd_key, error, program, dims, BLOCK_D
    )
    d_k += tl.dot(d_z_key, tl.trans(weight), input_precision=PRECISION) - d_target
    d_weight += tl.dot(tl.trans(k), d_z_key, input_precision=PRECISION)
    d_bias += tl.sum(d_z_key, axis=0)

    tl.store(token_grads.q + minibatch.tile, d_q, mask=minibatch.mask)
    tl.store(token_grads.k + minibatch.tile, d_k, mask=minibatch.mask)
    tl.store(token_grads.v + minibatch.tile, d_target, mask=minibatch.mask)
    tl.store(token_grads.lr + minibatch.rows, d_lr, mask=minibatch.real)
    grad_start = (d_weight, d_bias, d_sum_w, d_sum_b)
    return grad_start, d_tau, d_ln_weight + d_ln_weight_key, d_ln_bias + d_ln_bias_key


@triton.jit
def ttt_linear_backward_kernel(
    tokens,
    token_grads,
    shared,
    shared_grads,
    sequences,
    states,
    grad_final,
    grad_initial,
    dims,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """TTT-Linear's backward over every mini-batch of one (sequence, head): grad_final holds pointers to
    the gradients of the final state (W, b, S_W, S_b), grad_initial to those of the initial state,
    written (see the module docstring for the rest)."""
    program = program_setup(shared, sequences, dims, BLOCK_T, BLOCK_D, COMPUTE)
    tiles = linear_tiles(program, dims, BLOCK_D)
    w_tile, b_tile = tiles
    tau_tile = vector_tile(program.state_row, tl.arange(0, BLOCK_T), dims.mini_batch_size)
    w_scratch, b_scratch = states.scratch
    sw_in, sb_in = states.initial[2], states.initial[3]

    grad_state = load_linear_state(grad_final, tiles)
    d_tau = tl.zeros([BLOCK_T], dtype=COMPUTE)
    d_ln_weight = tl.zeros([BLOCK_D], dtype=COMPUTE)
    d_ln_bias = tl.zeros([BLOCK_D], dtype=COMPUTE)
    every = dims.checkpoint_every
    num_segments = (program.num_minibatches + every - 1) // every
    for segment_from_end in range(num_segments):
        first = (num_segments - 1 - segment_from_end) * every
        end = tl.minimum(first + every, program.num_minibatches)
        _replay_segment(
            tokens, program, states, tiles, first, end, dims, BLOCK_T, BLOCK_D, COMPUTE, PRECISION
        )
        # the mini-batches below read what other threads of this program just wrote
        tl.debug_barrier()
        for index_from_end in range(end - first):
            index = end - 1 - index_from_end
            minibatch = load_minibatch(tokens, program, index, dims, BLOCK_T, BLOCK_D, COMPUTE)
            weights = (
                _slot_load(w_scratch, w_tile, index - first, True),
                _slot_load(b_scratch, b_tile, index - first, True),
            )
            # zero without being read after the first mini-batch of a call
            sums = (
                _slot_load(sw_in, w_tile, 0, minibatch.first),
                _slot_load(sb_in, b_tile, 0, minibatch.first),
            )
            grad_state, d_tau_mb, d_ln_weight_mb, d_ln_bias_mb = _linear_minibatch_backward(
                minibatch, program, weights, sums, grad_state, token_grads, dims, BLOCK_T, BLOCK_D, PRECISION
            )
            d_tau += d_tau_mb
            d_ln_weight += d_ln_weight_mb
            d_ln_bias += d_ln_bias_mb
        # the next segment's replay overwrites the scratch
        tl.debug_barrier()

    store_linear_state(grad_initial, tiles, grad_state)
    tl.store(shared_grads.tau + tau_tile.offsets, d_tau, mask=tau_tile.mask)
    tl.store(shared_grads.ln_weight + b_tile.offsets, d_ln_weight, mask=b_tile.mask)
    tl.store(shared_grads.ln_bias + b_tile.offsets, d_ln_bias, mask=b_tile.mask)


LINEAR_BACKWARD_KERNEL, LINEAR_BACKWARD_META = tuned(ttt_linear_backward_kernel, LINEAR_BACKWARD_CONFIGS)
