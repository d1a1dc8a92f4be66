"""The fused Triton backward kernel of TTT-MLP, one program per (sequence, head) (the derivation:
docs/math.md section 14; the segment walk and the pieces it shares with TTT-Linear's:
``triton_backward``).

As in the forward (``triton_mlp``), the weights and their gradients are too large for registers: the
program streams hidden tiles of BLOCK_H units through them and keeps the rest in global memory. The
replay of a segment writes the weights (W1, b1, W2, b2) that start each of its mini-batches after
the first to scratch slots; the gradient of the state (dW1, db1, dW2, db2, dS_W1, dS_b1, dS_W2,
dS_b2) lives in the buffers of the initial state's gradient, which each mini-batch reads (the
sequence's last reads the final state's gradient instead) and overwrites with the gradient of the
state before it.

Each mini-batch takes four passes over the hidden tiles: (1) the keys' forward, for the last layer's
loss gradient g2; (2) the queries' forward, for Zbar2 and the hidden query-key products that layer
2's dual form needs whole; (3) back through each tile: the end-of-mini-batch update, both layers'
dual forms and g1 = (g2 W2^T) gelu'(Z1), which gives every tile's share of dg2; (4) once dg2, hence
dZ2, is whole, back through Z2 = X2 W2 + b2 and Z1 = K W1 + b1. Pass 3 leaves its part of dZ1 in a
scratch buffer [N, H, b, 4d] for pass 4.

Written per program, as for TTT-Linear: the gradients of its tokens' q, k, v and lr, of its initial
state, and its shares of the gradients w.r.t. tau, ln_weight and ln_bias.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ttt_mixer.ops.ttt.triton_backward import (
    add_shared_grads,
    bias_sums_read_backward,
    bias_update_backward,
    last_cell_share,
    no_shared_grads,
    num_segments,
    output_backward,
    scores_backward,
    segment_bounds,
    store_shared_grads,
    store_token_grads,
)
from ttt_mixer.ops.ttt.triton_helpers import (
    dual_form_finish,
    ln_fused_l2_grad,
    ln_fused_l2_grad_and_parts,
    ln_fused_l2_grad_backward,
    load_minibatch,
    mask_if,
    program_setup,
    slot_stride,
    tuned,
    vector_tile,
)
from ttt_mixer.ops.ttt.triton_mlp import (
    hidden_tile,
    hidden_tile_sums,
    mlp_key_output,
    mlp_query_pass,
    store_hidden_tiles,
)
from ttt_mixer.ops.ttt.triton_mlp_tile_backward import (
    hidden_grad_tile,
    hidden_tile_backward,
    key_tile_backward,
)

# as the forward's: wider hidden tiles spill registers at d = 64
MLP_BACKWARD_CONFIGS = [triton.Config({"BLOCK_H": h}, num_warps=w) for h in (32, 16) for w in (4, 8)]


@triton.jit
def _weights_slot(pointers, slot, dims):
    """The pointers (W1, b1, W2, b2) of slot ``slot`` of [slots, N, H, ...] tensors."""
    w1, b1, w2, b2 = pointers
    d, hidden = dims.head_dim, dims.hidden_dim
    return (
        w1 + slot * slot_stride(d * hidden),
        b1 + slot * slot_stride(hidden),
        w2 + slot * slot_stride(hidden * d),
        b2 + slot * slot_stride(d),
    )


@triton.jit
def _start_weights(initial, checkpoints, scratch, index, first, dims):
    """Pointers to the weights (W1, b1, W2, b2) that start mini-batch ``index`` of the segment whose
    first mini-batch is ``first``: the initial state's or a checkpoint's for ``first`` itself, else
    scratch slot index - first - 1, where the replay put them."""
    weights = _weights_slot(scratch, index - first - 1, dims)
    if index == first:
        weights = _weights_slot(checkpoints, first // dims.checkpoint_every - 1, dims)
        if first == 0:
            weights = initial
    return weights


@triton.jit
def _replay_segment(
    tokens, program, initial, checkpoints, scratch, sums, first, end, dims, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE,
    PRECISION,
):  # fmt: skip
    """Run the forward's weight recurrence over mini-batches first .. end - 2, storing the weights that
    start mini-batch index + 1 in scratch slot index - first. Each of these mini-batches is complete
    (only a sequence's last can end early), so each ends with the update W <- W - tau_b S."""
    sum_pointers = (sums[0], sums[1], sums[2])
    for index in range(first, end - 1):
        minibatch = load_minibatch(tokens, program, index, dims, BLOCK_T, BLOCK_D, COMPUTE)
        weights = _start_weights(initial, checkpoints, scratch, index, first, dims)
        w1_dst, b1_dst, w2_dst, b2_dst = _weights_slot(scratch, index - first, dims)
        z_key, b2 = mlp_key_output(
            minibatch, program, weights, dims, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE, PRECISION
        )
        grad2 = ln_fused_l2_grad(z_key, minibatch.v - minibatch.k, program, minibatch, dims, BLOCK_D)
        grad2_lr = grad2 * minibatch.lr[:, None]
        # the tiles' queries are not needed here: this product only fills hidden_tile's argument
        query_key = tl.dot(minibatch.q, tl.trans(minibatch.k), input_precision=PRECISION)
        for start in range(0, dims.hidden_dim, BLOCK_H):
            tile = hidden_tile(
                minibatch, program, weights, sum_pointers, start, grad2, query_key, dims, BLOCK_D, BLOCK_H,
                PRECISION,
            )  # fmt: skip
            sw1, sb1, sw2 = hidden_tile_sums(tile, minibatch, grad2_lr, PRECISION)
            tau = program.tau_last
            updated = (tile.w1 - tau * sw1, tile.b1 - tau * sb1, tile.w2 - tau * sw2)
            store_hidden_tiles(w1_dst, b1_dst, w2_dst, (tile.w1_tile, tile.b1_tile, tile.w2_tile), updated)
        b2_tile = vector_tile(program.state_row, tl.arange(0, BLOCK_D), dims.head_dim)
        sb2 = tl.load(sums[3] + b2_tile.offsets, mask=mask_if(b2_tile.mask, minibatch.first), other=0.0)
        b2 -= program.tau_last * (sb2 + tl.sum(grad2_lr, axis=0))
        tl.store(b2_dst + b2_tile.offsets, b2, mask=b2_tile.mask)
        # the next mini-batch reads what other threads of this program just wrote
        tl.debug_barrier()


@triton.jit
def _mlp_minibatch_backward(
    minibatch, program, weights, sums, grad_end, grad_start, hidden_grad_ptr, token_grads, dims, BLOCK_T,
    BLOCK_D, BLOCK_H, COMPUTE, PRECISION,
):  # fmt: skip
    """One mini-batch of TTT-MLP backward: from the pointers to its start weights (W1, b1, W2, b2), to
    the call's initial sums (read in the call's first mini-batch only) and to the gradient of the state
    after it (grad_end), writes the gradients of its tokens' q, k, v, lr and of the state before it
    (grad_start); returns its shares of the gradients w.r.t. tau [BLOCK_T], ln_weight and ln_bias
    [BLOCK_D]."""
    q, k, lr = minibatch.q, minibatch.k, minibatch.lr
    sum_pointers = (sums[0], sums[1], sums[2])
    b2_tile = vector_tile(program.state_row, tl.arange(0, BLOCK_D), dims.head_dim)

    # pass 1: the keys' forward, the last layer's loss gradient g2
    z_key, b2 = mlp_key_output(
        minibatch, program, weights, dims, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE, PRECISION
    )
    grad2, z_hat_key, rstd_key, error = ln_fused_l2_grad_and_parts(
        z_key, minibatch.v - k, program, minibatch, dims, BLOCK_D
    )
    grad2_lr = grad2 * lr[:, None]

    # pass 2: the queries' forward, Zbar2 and the hidden query-key products Xbar2 X2^T
    query_key = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    z_query, hidden_query_key = mlp_query_pass(
        minibatch, program, weights, sum_pointers, grad2, query_key, None, dims, False, False, BLOCK_T, BLOCK_D,
        BLOCK_H, COMPUTE, PRECISION,
    )  # fmt: skip
    sb2 = tl.load(sums[3] + b2_tile.offsets, mask=mask_if(b2_tile.mask, minibatch.first), other=0.0)
    z_query = dual_form_finish(z_query, hidden_query_key, grad2, b2, sb2, program, minibatch, PRECISION)

    # o = q + LN(Zbar2); layer 2's scores and its bias b2 (the tiles hold W2's rows only)
    d_q, d_z_query, d_ln_weight, d_ln_bias = output_backward(
        token_grads, minibatch, z_query, program, dims, BLOCK_D
    )
    d_hidden_query_key, d_tau, d_lr = scores_backward(
        -tl.dot(d_z_query, tl.trans(grad2), input_precision=PRECISION),
        hidden_query_key,
        minibatch,
        program,
        BLOCK_T,
    )
    scores2 = (hidden_query_key + 1.0) * minibatch.eta
    d_grad2 = -tl.dot(tl.trans(scores2), d_z_query, input_precision=PRECISION)
    d_b2_end = tl.load(grad_end[3] + b2_tile.offsets, mask=b2_tile.mask, other=0.0)
    d_sb2_end = tl.load(grad_end[7] + b2_tile.offsets, mask=b2_tile.mask, other=0.0)
    d_sb2, d_tau_last = bias_update_backward(grad2_lr, sb2, d_b2_end, d_sb2_end, program, minibatch)
    d_grad2_lr = tl.zeros([BLOCK_T, BLOCK_D], dtype=COMPUTE) + d_sb2[None, :]
    d_b2 = d_b2_end + tl.sum(d_z_query, axis=0)
    if minibatch.first:
        d_sb2_read, d_tau_read = bias_sums_read_backward(d_z_query, sb2, program)
        d_sb2 += d_sb2_read
        d_tau += d_tau_read

    # pass 3: back through every hidden tile
    scores1 = (query_key + 1.0) * minibatch.eta
    d_k = tl.zeros([BLOCK_T, BLOCK_D], dtype=COMPUTE)
    d_scores1 = tl.zeros([BLOCK_T, BLOCK_T], dtype=COMPUTE)
    for start in range(0, dims.hidden_dim, BLOCK_H):
        tile = hidden_tile(
            minibatch, program, weights, sum_pointers, start, grad2, query_key, dims, BLOCK_D, BLOCK_H, PRECISION
        )  # fmt: skip
        tile_shares = hidden_tile_backward(
            tile, minibatch, program, grad2, grad2_lr, d_z_query, d_hidden_query_key, scores1, grad_end,
            grad_start, hidden_grad_ptr, hidden_grad_tile(program, start, dims, BLOCK_T, BLOCK_H), PRECISION,
        )  # fmt: skip
        d_q += tile_shares[0]
        d_k += tile_shares[1]
        d_lr += tile_shares[2]
        d_tau += tile_shares[3]
        d_tau_last += tile_shares[4]
        d_grad2 += tile_shares[5]
        d_grad2_lr += tile_shares[6]
        d_scores1 += tile_shares[7]

    # layer 1's scores eta * (Q K^T + 1)
    d_query_key, d_tau_scores1, d_lr_scores1 = scores_backward(
        d_scores1, query_key, minibatch, program, BLOCK_T
    )
    d_q += tl.dot(d_query_key, k, input_precision=PRECISION)
    d_k += tl.dot(tl.trans(d_query_key), q, input_precision=PRECISION)
    d_tau += d_tau_scores1
    d_lr += d_lr_scores1

    # g2 = dl/dZ2 at Z2, target V - K
    d_lr += tl.sum(grad2 * d_grad2_lr, axis=1)
    d_grad2 += lr[:, None] * d_grad2_lr
    d_grad2 = tl.where(minibatch.real[:, None], d_grad2, 0.0)
    d_z_key, d_target, d_ln_weight_key, d_ln_bias_key = ln_fused_l2_grad_backward(
        d_grad2, grad2, z_hat_key, rstd_key, error, program, dims, BLOCK_D
    )
    d_k -= d_target
    tl.store(grad_start[3] + b2_tile.offsets, d_b2 + tl.sum(d_z_key, axis=0), mask=b2_tile.mask)
    tl.store(grad_start[7] + b2_tile.offsets, d_sb2, mask=b2_tile.mask)
    # pass 4 reads what other threads of this program wrote in pass 3
    tl.debug_barrier()

    # pass 4: Z2 = X2 W2 + b2 and Z1 = K W1 + b1
    for start in range(0, dims.hidden_dim, BLOCK_H):
        d_k += key_tile_backward(
            minibatch, program, weights, start, d_z_key, grad_start, hidden_grad_ptr, dims, BLOCK_T, BLOCK_D,
            BLOCK_H, PRECISION,
        )  # fmt: skip
    store_token_grads(token_grads, minibatch, d_q, d_k, d_target, d_lr)
    d_tau += last_cell_share(d_tau_last, dims, BLOCK_T)
    # the mini-batch before reads what this one wrote
    tl.debug_barrier()
    return d_tau, d_ln_weight + d_ln_weight_key, d_ln_bias + d_ln_bias_key


@triton.jit
def ttt_mlp_backward_kernel(
    tokens, token_grads, shared, shared_grads, sequences, states, grad_final, grad_initial, dims,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """TTT-MLP's backward over every mini-batch of one (sequence, head): grad_final holds pointers to
    the gradients of the final state (W1, b1, W2, b2, S_W1, S_b1, S_W2, S_b2), grad_initial to those of
    the initial state, written (see the module docstring for the rest)."""
    program = program_setup(shared, sequences, dims, BLOCK_T, BLOCK_D, COMPUTE)
    w1_in, b1_in, w2_in, b2_in, sw1_in, sb1_in, sw2_in, sb2_in = states.initial
    w1_scratch, b1_scratch, w2_scratch, b2_scratch, hidden_grad = states.scratch
    initial = (w1_in, b1_in, w2_in, b2_in)
    sums = (sw1_in, sb1_in, sw2_in, sb2_in)
    scratch = (w1_scratch, b1_scratch, w2_scratch, b2_scratch)

    shares = no_shared_grads(BLOCK_T, BLOCK_D, COMPUTE)
    for segment_from_end in range(num_segments(program, dims)):
        first, end = segment_bounds(program, segment_from_end, dims)
        _replay_segment(
            tokens, program, initial, states.checkpoints, scratch, sums, first, end, dims, BLOCK_T, BLOCK_D,
            BLOCK_H, COMPUTE, PRECISION,
        )  # fmt: skip
        for index_from_end in range(end - first):
            index = end - 1 - index_from_end
            minibatch = load_minibatch(tokens, program, index, dims, BLOCK_T, BLOCK_D, COMPUTE)
            # the sequence's last mini-batch starts from the final state's gradient, every other one
            # from what the mini-batch after it wrote
            grad_end = grad_initial
            if index == program.num_minibatches - 1:
                grad_end = grad_final
            minibatch_shares = _mlp_minibatch_backward(
                minibatch, program, _start_weights(initial, states.checkpoints, scratch, index, first, dims),
                sums, grad_end, grad_initial, hidden_grad, token_grads, dims, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE,
                PRECISION,
            )  # fmt: skip
            shares = add_shared_grads(shares, minibatch_shares)

    store_shared_grads(shared_grads, program, shares, dims, BLOCK_T, BLOCK_D)


# the interpreter pays per operation, not per element: fewer, wider hidden tiles keep the CPU tests
# short (on a GPU such tiles spill registers)
MLP_BACKWARD_KERNEL, MLP_BACKWARD_META = tuned(
    ttt_mlp_backward_kernel, MLP_BACKWARD_CONFIGS, interpreter_meta={"BLOCK_H": 64}
)
