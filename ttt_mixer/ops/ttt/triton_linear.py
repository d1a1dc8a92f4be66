"""The Triton forward kernel of TTT-Linear, one program per (sequence, head): W, b, S_W, S_b stay in
registers across all mini-batches (see ``triton_helpers`` for the mini-batch recurrence it runs and
the argument groups it takes)."""

from __future__ import annotations

import triton
import triton.language as tl

from ttt_mixer.ops.ttt.triton_helpers import (
    apply_update,
    dual_form_finish,
    dual_form_partial,
    ln_fused_l2_grad,
    load_minibatch,
    matrix_tile,
    program_setup,
    store_checkpoint,
    store_output,
    tuned,
    vector_tile,
)

LINEAR_CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8, 2)]


@triton.jit
def linear_loss_grad(
    minibatch, program, weight, bias, dims, eps, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr
):
    """The loss gradient g = dl/dZ of every key of the mini-batch at the weights (W, b)."""
    k = minibatch.k
    z_key = tl.dot(k, weight, input_precision=PRECISION) + bias[None, :]
    return ln_fused_l2_grad(z_key, minibatch.v - k, program, minibatch, dims, eps, BLOCK_D)


@triton.jit
def linear_advance(minibatch, program, state, grad, PRECISION: tl.constexpr):
    """The state (W, b, S_W, S_b) after the mini-batch, from the state before it and the keys' loss
    gradient: S_end = S + sum_j lr_j [k_j; 1]^T g_j, then the update of ``apply_update``."""
    weight, bias, sum_w, sum_b = state
    grad_lr = grad * minibatch.lr[:, None]
    sum_w_end = tl.dot(tl.trans(minibatch.k), grad_lr, input_precision=PRECISION)
    sum_b_end = tl.sum(grad_lr, axis=0)
    if minibatch.first:
        sum_w_end += sum_w
        sum_b_end += sum_b
    weight, sum_w = apply_update(weight, sum_w_end, program, minibatch)
    bias, sum_b = apply_update(bias, sum_b_end, program, minibatch)
    return weight, bias, sum_w, sum_b


@triton.jit
def linear_query_forward(minibatch, program, state, grad, PRECISION: tl.constexpr):
    """Zbar, the dual form of every query of the mini-batch before the output LayerNorm, and the
    query-key products Q K^T it used."""
    weight, bias, sum_w, sum_b = state
    q = minibatch.q
    z_query = dual_form_partial(q, weight, sum_w, program, minibatch, PRECISION)
    query_key = tl.dot(q, tl.trans(minibatch.k), input_precision=PRECISION)
    z_query = dual_form_finish(z_query, query_key, grad, bias, sum_b, program, minibatch, PRECISION)
    return z_query, query_key


@triton.jit
def _linear_minibatch(
    minibatch, program, state, o_ptr, dims, eps, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr
):
    """One mini-batch of TTT-Linear: writes its outputs and returns the state (W, b, S_W, S_b) after it,
    from the state in registers before it."""
    grad = linear_loss_grad(minibatch, program, state[0], state[1], dims, eps, BLOCK_D, PRECISION)
    z_query, _ = linear_query_forward(minibatch, program, state, grad, PRECISION)
    store_output(o_ptr, minibatch, z_query, program, dims, eps, BLOCK_D)
    return linear_advance(minibatch, program, state, grad, PRECISION)


@triton.jit
def ttt_linear_forward_kernel(
    tokens,
    o,
    shared,
    sequences,
    state_in,
    state_out,
    checkpoints,
    dims,
    eps,
    STORE_CHECKPOINTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """TTT-Linear over every mini-batch of one (sequence, head); state_in / state_out hold pointers to
    (W, b, S_W, S_b), checkpoints to (W, b) (see ``triton_helpers``)."""
    program = program_setup(shared, sequences, dims, BLOCK_T, BLOCK_D, COMPUTE)
    cols = tl.arange(0, BLOCK_D)
    w_tile = matrix_tile(program.state_row, cols, cols, dims.head_dim, dims.head_dim)
    b_tile = vector_tile(program.state_row, cols, dims.head_dim)
    w_ckpt, b_ckpt = checkpoints

    w_in, b_in, sw_in, sb_in = state_in
    state = (
        tl.load(w_in + w_tile.offsets, mask=w_tile.mask, other=0.0),
        tl.load(b_in + b_tile.offsets, mask=b_tile.mask, other=0.0),
        tl.load(sw_in + w_tile.offsets, mask=w_tile.mask, other=0.0),
        tl.load(sb_in + b_tile.offsets, mask=b_tile.mask, other=0.0),
    )
    for index in range(program.num_minibatches):
        minibatch = load_minibatch(tokens, program, index, dims, BLOCK_T, BLOCK_D, COMPUTE)
        state = _linear_minibatch(minibatch, program, state, o, dims, eps, BLOCK_D, PRECISION)
        if STORE_CHECKPOINTS:
            store_checkpoint(w_ckpt, w_tile, state[0], minibatch, dims.checkpoint_every)
            store_checkpoint(b_ckpt, b_tile, state[1], minibatch, dims.checkpoint_every)

    w_out, b_out, sw_out, sb_out = state_out
    weight, bias, sum_w, sum_b = state
    tl.store(w_out + w_tile.offsets, weight, mask=w_tile.mask)
    tl.store(b_out + b_tile.offsets, bias, mask=b_tile.mask)
    tl.store(sw_out + w_tile.offsets, sum_w, mask=w_tile.mask)
    tl.store(sb_out + b_tile.offsets, sum_b, mask=b_tile.mask)


LINEAR_KERNEL, LINEAR_META = tuned(ttt_linear_forward_kernel, LINEAR_CONFIGS)
