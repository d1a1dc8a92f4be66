"""The fused Triton backward kernel of TTT-Linear, one program per (sequence, head) (the derivation of
every gradient: docs/math.md section 14; what it shares with TTT-MLP's: ``triton_backward``).

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
"""

from __future__ import annotations

import triton
import triton.language as tl

from ttt_mixer.ops.ttt.triton_backward import (
    add_shared_grads,
    last_cell_share,
    layer_dual_form_backward,
    layer_update_backward,
    no_shared_grads,
    num_segments,
    output_backward,
    scores_backward,
    segment_bounds,
    slot_load,
    slot_store,
    store_shared_grads,
    store_token_grads,
)
from ttt_mixer.ops.ttt.triton_helpers import (
    ln_fused_l2_grad_and_parts,
    ln_fused_l2_grad_backward,
    load_minibatch,
    program_setup,
    tuned,
)
from ttt_mixer.ops.ttt.triton_linear import (
    linear_advance,
    linear_loss_grad,
    linear_query_forward,
    linear_tiles,
    load_linear_state,
    store_linear_state,
)

LINEAR_BACKWARD_CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8)]


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
        slot_load(w_in, w_tile, 0, at_start) + slot_load(w_ckpt, w_tile, slot, first > 0),
        slot_load(b_in, b_tile, 0, at_start) + slot_load(b_ckpt, b_tile, slot, first > 0),
        slot_load(sw_in, w_tile, 0, at_start),
        slot_load(sb_in, b_tile, 0, at_start),
    )
    for index in range(first, end):
        slot_store(w_scratch, w_tile, index - first, state[0])
        slot_store(b_scratch, b_tile, index - first, state[1])
        minibatch = load_minibatch(tokens, program, index, dims, BLOCK_T, BLOCK_D, COMPUTE)
        grad = linear_loss_grad(minibatch, program, state[0], state[1], dims, BLOCK_D, PRECISION)
        state = linear_advance(minibatch, program, state, grad, PRECISION)


@triton.jit
def _linear_minibatch_backward(
    minibatch, program, weights, sums, grad_end, token_grads, dims, BLOCK_T, BLOCK_D, PRECISION
):
    """One mini-batch of TTT-Linear backward: from its start weights (W, b), its start sums (S_W, S_b;
    zero unless it is the call's first) and the gradient of the state after it, writes the gradients
    of its tokens' q, k, v, lr and returns the gradient of the state before it, and the mini-batch's
    shares of the gradients w.r.t. tau [BLOCK_T], ln_weight and ln_bias [BLOCK_D]."""
    weight, bias = weights
    q, k = minibatch.q, minibatch.k

    # recompute the forward of the mini-batch
    z_key = tl.dot(k, weight, input_precision=PRECISION) + bias[None, :]
    grad, z_hat_key, rstd_key, error = ln_fused_l2_grad_and_parts(
        z_key, minibatch.v - k, program, minibatch, dims, BLOCK_D
    )
    z_query, query_key = linear_query_forward(
        minibatch, program, (weight, bias, sums[0], sums[1]), grad, PRECISION
    )
    d_q, d_z_query, d_ln_weight, d_ln_bias = output_backward(
        token_grads, minibatch, z_query, program, dims, BLOCK_D
    )

    # the accumulated sums and the update at the end
    d_sums, d_tau_last, d_k, d_lr, d_grad = layer_update_backward(
        k, grad, sums, grad_end, program, minibatch, PRECISION
    )

    # Zbar = Q W + b - tau (Q S_W + S_b) - (eta * (Q K^T + 1)) g
    scores = (query_key + 1.0) * minibatch.eta
    d_q_layer, d_weights, d_grad_layer, d_scores, d_sums_read, d_tau = layer_dual_form_backward(
        d_z_query, q, weight, grad, scores, sums, program, minibatch, PRECISION
    )
    d_query_key, d_tau_scores, d_lr_scores = scores_backward(d_scores, query_key, minibatch, program, BLOCK_T)
    d_q += d_q_layer + tl.dot(d_query_key, k, input_precision=PRECISION)
    d_k += tl.dot(tl.trans(d_query_key), q, input_precision=PRECISION)
    d_grad += d_grad_layer
    d_lr += d_lr_scores
    d_tau += d_tau_scores + last_cell_share(d_tau_last, dims, BLOCK_T)

    # g = dl/dZ at Z = K W + b, target V - K
    d_grad = tl.where(minibatch.real[:, None], d_grad, 0.0)
    d_z_key, d_target, d_ln_weight_key, d_ln_bias_key = ln_fused_l2_grad_backward(
        d_grad, grad, z_hat_key, rstd_key, error, program, dims, BLOCK_D
    )
    d_k += tl.dot(d_z_key, tl.trans(weight), input_precision=PRECISION) - d_target
    d_weight = grad_end[0] + d_weights[0] + tl.dot(tl.trans(k), d_z_key, input_precision=PRECISION)
    d_bias = grad_end[1] + d_weights[1] + tl.sum(d_z_key, axis=0)

    store_token_grads(token_grads, minibatch, d_q, d_k, d_target, d_lr)
    grad_start = (d_weight, d_bias, d_sums[0] + d_sums_read[0], d_sums[1] + d_sums_read[1])
    return grad_start, (d_tau, d_ln_weight + d_ln_weight_key, d_ln_bias + d_ln_bias_key)


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
    w_scratch, b_scratch = states.scratch
    sw_in, sb_in = states.initial[2], states.initial[3]

    grad_state = load_linear_state(grad_final, tiles)
    shares = no_shared_grads(BLOCK_T, BLOCK_D, COMPUTE)
    for segment_from_end in range(num_segments(program, dims)):
        first, end = segment_bounds(program, segment_from_end, dims)
        _replay_segment(
            tokens, program, states, tiles, first, end, dims, BLOCK_T, BLOCK_D, COMPUTE, PRECISION
        )
        # the mini-batches below read what other threads of this program just wrote
        tl.debug_barrier()
        for index_from_end in range(end - first):
            index = end - 1 - index_from_end
            minibatch = load_minibatch(tokens, program, index, dims, BLOCK_T, BLOCK_D, COMPUTE)
            weights = (
                slot_load(w_scratch, w_tile, index - first, True),
                slot_load(b_scratch, b_tile, index - first, True),
            )
            # zero without being read after the first mini-batch of a call
            sums = (
                slot_load(sw_in, w_tile, 0, minibatch.first),
                slot_load(sb_in, b_tile, 0, minibatch.first),
            )
            grad_state, minibatch_shares = _linear_minibatch_backward(
                minibatch, program, weights, sums, grad_state, token_grads, dims, BLOCK_T, BLOCK_D, PRECISION
            )
            shares = add_shared_grads(shares, minibatch_shares)
        # the next segment's replay overwrites the scratch
        tl.debug_barrier()

    store_linear_state(grad_initial, tiles, grad_state)
    store_shared_grads(shared_grads, program, shares, dims, BLOCK_T, BLOCK_D)


LINEAR_BACKWARD_KERNEL, LINEAR_BACKWARD_META = tuned(ttt_linear_backward_kernel, LINEAR_BACKWARD_CONFIGS)
