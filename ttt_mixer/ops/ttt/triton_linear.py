"""TTT-Linear's mini-batch recurrence for the Triton kernels, one program per (sequence, head): W, b,
S_W, S_b stay in registers across all mini-batches (see ``triton_helpers`` for the recurrence and
the argument groups). ``linear_forward`` is the forward kernel's program (``triton_forward``); the
pieces it is built of also serve the backward kernel (``triton_linear_backward``)."""

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
    store_checkpoint,
    store_output,
    vector_tile,
)


@triton.jit
def linear_tiles(program, dims, BLOCK_D: tl.constexpr):
    """Where the program's W [d, d] and b [d] lie in [N, H, ...] state tensors."""
    cols = tl.arange(0, BLOCK_D)
    return (
        matrix_tile(program.state_row, cols, cols, dims.head_dim, dims.head_dim),
        vector_tile(program.state_row, cols, dims.head_dim),
    )


@triton.jit
def load_linear_state(pointers, tiles):
    """(W, b, S_W, S_b), or their gradients, from the program's part of four [N, H, ...] tensors."""
    w_tile, b_tile = tiles
    w_ptr, b_ptr, sw_ptr, sb_ptr = pointers
    return (
        tl.load(w_ptr + w_tile.offsets, mask=w_tile.mask, other=0.0),
        tl.load(b_ptr + b_tile.offsets, mask=b_tile.mask, other=0.0),
        tl.load(sw_ptr + w_tile.offsets, mask=w_tile.mask, other=0.0),
        tl.load(sb_ptr + b_tile.offsets, mask=b_tile.mask, other=0.0),
    )


@triton.jit
def store_linear_state(pointers, tiles, state):
    """The inverse of ``load_linear_state``."""
    w_tile, b_tile = tiles
    w_ptr, b_ptr, sw_ptr, sb_ptr = pointers
    weight, bias, sum_w, sum_b = state
    tl.store(w_ptr + w_tile.offsets, weight, mask=w_tile.mask)
    tl.store(b_ptr + b_tile.offsets, bias, mask=b_tile.mask)
    tl.store(sw_ptr + w_tile.offsets, sum_w, mask=w_tile.mask)
    tl.store(sb_ptr + b_tile.offsets, sum_b, mask=b_tile.mask)


@triton.jit
def linear_loss_grad(minibatch, program, weight, bias, dims, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """The loss gradient g = dl/dZ of every key of the mini-batch at the weights (W, b)."""
    k = minibatch.k
    z_key = tl.dot(k, weight, input_precision=PRECISION) + bias[None, :]
    return ln_fused_l2_grad(z_key, minibatch.v - k, program, minibatch, dims, BLOCK_D)


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
def _linear_minibatch(minibatch, program, state, o_ptr, dims, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One mini-batch of TTT-Linear: writes its outputs and returns the state (W, b, S_W, S_b) after it,
    from the state in registers before it."""
    grad = linear_loss_grad(minibatch, program, state[0], state[1], dims, BLOCK_D, PRECISION)
    z_query, _ = linear_query_forward(minibatch, program, state, grad, PRECISION)
    store_output(o_ptr, minibatch, z_query, program, dims, BLOCK_D)
    return linear_advance(minibatch, program, state, grad, PRECISION)


@triton.jit
def linear_forward(
    tokens, o, program, buffers, dims, STORE_CHECKPOINTS, BLOCK_T, BLOCK_D, COMPUTE, PRECISION
):
    """TTT-Linear over every mini-batch of the program's sequence and head; the buffers' states hold
    (W, b, S_W, S_b), the checkpoints (W, b)."""
    tiles = linear_tiles(program, dims, BLOCK_D)
    w_ckpt, b_ckpt = buffers.checkpoints
    state = load_linear_state(buffers.initial, tiles)
    for index in range(program.num_minibatches):
        minibatch = load_minibatch(tokens, program, index, dims, BLOCK_T, BLOCK_D, COMPUTE)
        state = _linear_minibatch(minibatch, program, state, o, dims, BLOCK_D, PRECISION)
        if STORE_CHECKPOINTS:
            store_checkpoint(w_ckpt, tiles[0], state[0], program, minibatch, dims.checkpoint_every)
            store_checkpoint(b_ckpt, tiles[1], state[1], program, minibatch, dims.checkpoint_every)
    store_linear_state(buffers.final, tiles, state)
