"""TTT-MLP's mini-batch recurrence for the Triton forward kernel (``triton_forward``), one program per
(sequence, head) (see ``triton_helpers`` for the recurrence and the argument groups).

TTT-MLP tiles the hidden dimension (4d) by ``BLOCK_H`` and keeps the weights in the output state
buffers (L2-resident), streaming tiles through registers twice per mini-batch: once for the forward of
the keys (the loss gradient needs the whole hidden layer), once for everything else. The first
mini-batch reads the input state and writes the output state, so the input is never modified and a
kernel run can be repeated (autotuning does).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ttt_mixer.ops.ttt.triton_helpers import (
    apply_update,
    dual_form_finish,
    dual_form_partial,
    gelu_tanh,
    ln_fused_l2_grad,
    load_minibatch,
    mask_if,
    mask_unless,
    matrix_tile,
    store_checkpoint,
    store_output,
    vector_tile,
)


@triton.jit
def _hidden_tiles(state_row, start, dims, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """The tiles of hidden units start .. start + BLOCK_H: columns of W1 [d, 4d], entries of b1 [4d],
    rows of W2 [4d, d]."""
    cols = tl.arange(0, BLOCK_D)
    units = start + tl.arange(0, BLOCK_H)
    return (
        matrix_tile(state_row, cols, units, dims.head_dim, dims.hidden_dim),
        vector_tile(state_row, units, dims.hidden_dim),
        matrix_tile(state_row, units, cols, dims.hidden_dim, dims.head_dim),
    )


@triton.jit
def _load_hidden_tiles(w1_ptr, b1_ptr, w2_ptr, tiles, condition):
    """W1, b1 and W2 on the hidden tiles, where the scalar condition holds (zeros elsewhere)."""
    w1_tile, b1_tile, w2_tile = tiles
    return (
        tl.load(w1_ptr + w1_tile.offsets, mask=mask_if(w1_tile.mask, condition), other=0.0),
        tl.load(b1_ptr + b1_tile.offsets, mask=mask_if(b1_tile.mask, condition), other=0.0),
        tl.load(w2_ptr + w2_tile.offsets, mask=mask_if(w2_tile.mask, condition), other=0.0),
    )


@triton.jit
def _write_update(
    targets, tile, weight, sums_end, program, minibatch, checkpoint_every, STORE_CHECKPOINTS: tl.constexpr
):
    """Store one tile of a layer after its mini-batch to targets (the weight, its accumulator, its
    checkpoints). The output accumulators start zeroed and a complete mini-batch leaves them zero, so
    only an incomplete one (a sequence's last) writes them."""
    weight_ptr, sums_ptr, ckpt_ptr = targets
    weight, _ = apply_update(weight, sums_end, program, minibatch)
    tl.store(weight_ptr + tile.offsets, weight, mask=tile.mask)
    tl.store(sums_ptr + tile.offsets, sums_end, mask=mask_unless(tile.mask, minibatch.complete))
    if STORE_CHECKPOINTS:
        store_checkpoint(ckpt_ptr, tile, weight, program, minibatch, checkpoint_every)


@triton.jit
def _mlp_minibatch(
    minibatch, program, buffers, o_ptr, dims, STORE_CHECKPOINTS, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE, PRECISION
):
    """One mini-batch of TTT-MLP, one hidden tile at a time: reads the state from the final buffers
    (the initial ones for the first mini-batch of a call, which moves the state across) and writes it
    there."""
    src = buffers.final
    if minibatch.first:
        src = buffers.initial
    w1_src, b1_src, w2_src, b2_src, sw1_src, sb1_src, sw2_src, sb2_src = src
    w1_dst, b1_dst, w2_dst, b2_dst, sw1_dst, sb1_dst, sw2_dst, sb2_dst = buffers.final
    w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt = buffers.checkpoints
    q, k, lr = minibatch.q, minibatch.k, minibatch.lr
    b2_tile = vector_tile(program.state_row, tl.arange(0, BLOCK_D), dims.head_dim)

    # pass 1: the keys' forward through both layers, for the loss gradient at the last layer
    z_key = tl.zeros([BLOCK_T, BLOCK_D], dtype=COMPUTE)
    for start in range(0, dims.hidden_dim, BLOCK_H):
        tiles = _hidden_tiles(program.state_row, start, dims, BLOCK_D, BLOCK_H)
        w1, b1, w2 = _load_hidden_tiles(w1_src, b1_src, w2_src, tiles, True)
        hidden_key, _ = gelu_tanh(tl.dot(k, w1, input_precision=PRECISION) + b1[None, :])
        z_key += tl.dot(hidden_key, w2, input_precision=PRECISION)
    b2 = tl.load(b2_src + b2_tile.offsets, mask=b2_tile.mask, other=0.0)
    grad2 = ln_fused_l2_grad(z_key + b2[None, :], minibatch.v - k, program, minibatch, dims, BLOCK_D)
    grad2_lr = grad2 * lr[:, None]

    # pass 2, per hidden tile: the hidden gradient, the dual form of layer 1, its share of layer 2's
    # dual form, and the tile's update
    query_key = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    z_query = tl.zeros([BLOCK_T, BLOCK_D], dtype=COMPUTE)
    hidden_query_key = tl.zeros([BLOCK_T, BLOCK_T], dtype=COMPUTE)
    for start in range(0, dims.hidden_dim, BLOCK_H):
        tiles = _hidden_tiles(program.state_row, start, dims, BLOCK_D, BLOCK_H)
        w1_tile, b1_tile, w2_tile = tiles
        w1, b1, w2 = _load_hidden_tiles(w1_src, b1_src, w2_src, tiles, True)
        # zero without being read after the first mini-batch of a call
        sw1, sb1, sw2 = _load_hidden_tiles(sw1_src, sb1_src, sw2_src, tiles, minibatch.first)

        hidden_key, gelu_grad = gelu_tanh(tl.dot(k, w1, input_precision=PRECISION) + b1[None, :])
        grad1 = tl.dot(grad2, tl.trans(w2), input_precision=PRECISION) * gelu_grad
        z1_query = dual_form_partial(q, w1, sw1, program, minibatch, PRECISION)
        z1_query = dual_form_finish(z1_query, query_key, grad1, b1, sb1, program, minibatch, PRECISION)
        hidden_query, _ = gelu_tanh(z1_query)
        z_query += dual_form_partial(hidden_query, w2, sw2, program, minibatch, PRECISION)
        hidden_query_key += tl.dot(hidden_query, tl.trans(hidden_key), input_precision=PRECISION)

        grad1_lr = grad1 * lr[:, None]
        sw1 += tl.dot(tl.trans(k), grad1_lr, input_precision=PRECISION)
        sb1 += tl.sum(grad1_lr, axis=0)
        sw2 += tl.dot(tl.trans(hidden_key), grad2_lr, input_precision=PRECISION)
        _write_update(
            (w1_dst, sw1_dst, w1_ckpt), w1_tile, w1, sw1, program, minibatch, dims.checkpoint_every,
            STORE_CHECKPOINTS,
        )  # fmt: skip
        _write_update(
            (b1_dst, sb1_dst, b1_ckpt), b1_tile, b1, sb1, program, minibatch, dims.checkpoint_every,
            STORE_CHECKPOINTS,
        )  # fmt: skip
        _write_update(
            (w2_dst, sw2_dst, w2_ckpt), w2_tile, w2, sw2, program, minibatch, dims.checkpoint_every,
            STORE_CHECKPOINTS,
        )  # fmt: skip

    sb2 = tl.load(sb2_src + b2_tile.offsets, mask=mask_if(b2_tile.mask, minibatch.first), other=0.0)
    z_query = dual_form_finish(z_query, hidden_query_key, grad2, b2, sb2, program, minibatch, PRECISION)
    store_output(o_ptr, minibatch, z_query, program, dims, BLOCK_D)
    _write_update(
        (b2_dst, sb2_dst, b2_ckpt), b2_tile, b2, sb2 + tl.sum(grad2_lr, axis=0), program, minibatch,
        dims.checkpoint_every, STORE_CHECKPOINTS,
    )  # fmt: skip
    # the next mini-batch reads what other threads of this program just wrote
    tl.debug_barrier()


@triton.jit
def mlp_forward(
    tokens, o, program, buffers, dims, STORE_CHECKPOINTS, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE, PRECISION
):
    """TTT-MLP over every mini-batch of the program's sequence and head; the buffers' states hold
    (W1, b1, W2, b2, S_W1, S_b1, S_W2, S_b2), the checkpoints (W1, b1, W2, b2)."""
    for index in range(program.num_minibatches):
        minibatch = load_minibatch(tokens, program, index, dims, BLOCK_T, BLOCK_D, COMPUTE)
        _mlp_minibatch(
            minibatch, program, buffers, o, dims, STORE_CHECKPOINTS, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE,
            PRECISION,
        )  # fmt: skip
