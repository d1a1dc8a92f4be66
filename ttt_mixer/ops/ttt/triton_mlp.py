"""TTT-MLP's mini-batch recurrence for the Triton forward kernel (``triton_forward``), one program per
(sequence, head) (see ``triton_helpers`` for the recurrence and the argument groups).

TTT-MLP tiles the hidden dimension (4d) by ``BLOCK_H`` and keeps the weights in the output state
buffers (L2-resident), streaming tiles through registers twice per mini-batch: once for the forward of
the keys (the loss gradient needs the whole hidden layer), once for everything else. The first
mini-batch reads the input state and writes the output state, so the input is never modified and a
kernel run can be repeated (autotuning does). The pieces of a mini-batch (``mlp_key_output``,
``hidden_tile``, ``mlp_query_pass``) also serve the backward kernel (``triton_mlp_backward``).
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from ttt_mixer.ops.ttt.triton_helpers import (
    Tile,
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


class HiddenTile(NamedTuple):
    """One tile of BLOCK_H hidden units of a mini-batch, loaded and recomputed from the weights that
    start the mini-batch (docs/math.md section 4: Z1 = K W1 + b1, X2 = gelu(Z1), g1 = (g2 W2^T) gelu'(Z1),
    Zbar1 the dual form of the queries, Xbar2 = gelu(Zbar1))."""

    w1_tile: Tile  # where the tile's columns of W1 [d, 4d], entries of b1 [4d], rows of W2 [4d, d] lie
    b1_tile: Tile
    w2_tile: Tile
    w1: tl.tensor
    b1: tl.tensor
    w2: tl.tensor
    sw1: tl.tensor  # the sums, zero unless the mini-batch is the call's first
    sb1: tl.tensor
    sw2: tl.tensor
    z1_key: tl.tensor  # [BLOCK_T, BLOCK_H] Z1
    hidden_key: tl.tensor  # X2
    gelu_grad_key: tl.tensor  # gelu'(Z1)
    hidden_grad: tl.tensor  # g2 W2^T
    grad1: tl.tensor  # g1
    hidden_query: tl.tensor  # Xbar2
    gelu_grad_query: tl.tensor  # gelu'(Zbar1)


@triton.jit
def hidden_tiles(state_row, start, dims, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
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
def load_hidden_tiles(w1_ptr, b1_ptr, w2_ptr, tiles, condition):
    """W1, b1 and W2 (or what lies like them) on the hidden tiles, where the scalar condition holds
    (zeros elsewhere)."""
    w1_tile, b1_tile, w2_tile = tiles
    return (
        tl.load(w1_ptr + w1_tile.offsets, mask=mask_if(w1_tile.mask, condition), other=0.0),
        tl.load(b1_ptr + b1_tile.offsets, mask=mask_if(b1_tile.mask, condition), other=0.0),
        tl.load(w2_ptr + w2_tile.offsets, mask=mask_if(w2_tile.mask, condition), other=0.0),
    )


@triton.jit
def store_hidden_tiles(w1_ptr, b1_ptr, w2_ptr, tiles, values):
    """The inverse of ``load_hidden_tiles``."""
    w1_tile, b1_tile, w2_tile = tiles
    w1, b1, w2 = values
    tl.store(w1_ptr + w1_tile.offsets, w1, mask=w1_tile.mask)
    tl.store(b1_ptr + b1_tile.offsets, b1, mask=b1_tile.mask)
    tl.store(w2_ptr + w2_tile.offsets, w2, mask=w2_tile.mask)


@triton.jit
def mlp_key_output(
    minibatch,
    program,
    weights,
    dims,
    BLOCK_T,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COMPUTE,
    PRECISION,
):
    """Z2 = gelu(K W1 + b1) W2 + b2 for the keys, one hidden tile at a time, from the pointers
    (W1, b1, W2, b2); and b2."""
    w1_ptr, b1_ptr, w2_ptr, b2_ptr = weights
    k = minibatch.k
    z_key = tl.zeros([BLOCK_T, BLOCK_D], dtype=COMPUTE)
    for start in range(0, dims.hidden_dim, BLOCK_H):
        tiles = hidden_tiles(program.state_row, start, dims, BLOCK_D, BLOCK_H)
        w1, b1, w2 = load_hidden_tiles(w1_ptr, b1_ptr, w2_ptr, tiles, True)
        hidden_key, _ = gelu_tanh(tl.dot(k, w1, input_precision=PRECISION) + b1[None, :])
        z_key += tl.dot(hidden_key, w2, input_precision=PRECISION)
    b2_tile = vector_tile(program.state_row, tl.arange(0, BLOCK_D), dims.head_dim)
    b2 = tl.load(b2_ptr + b2_tile.offsets, mask=b2_tile.mask, other=0.0)
    return z_key + b2[None, :], b2


@triton.jit
def hidden_tile(
    minibatch, program, weights, sums, start, grad2, query_key, dims, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """The ``HiddenTile`` of hidden units start .. start + BLOCK_H from the pointers weights
    (W1, b1, W2, ...) and sums (S_W1, S_b1, S_W2, ...), the last layer's loss gradient g2 and the
    queries' and keys' products Q K^T."""
    q, k = minibatch.q, minibatch.k
    tiles = hidden_tiles(program.state_row, start, dims, BLOCK_D, BLOCK_H)
    w1, b1, w2 = load_hidden_tiles(weights[0], weights[1], weights[2], tiles, True)
    # zero without being read after the first mini-batch of a call
    sw1, sb1, sw2 = load_hidden_tiles(sums[0], sums[1], sums[2], tiles, minibatch.first)
    z1_key = tl.dot(k, w1, input_precision=PRECISION) + b1[None, :]
    hidden_key, gelu_grad_key = gelu_tanh(z1_key)
    hidden_grad = tl.dot(grad2, tl.trans(w2), input_precision=PRECISION)
    grad1 = hidden_grad * gelu_grad_key
    z1_query = dual_form_partial(q, w1, sw1, program, minibatch, PRECISION)
    z1_query = dual_form_finish(z1_query, query_key, grad1, b1, sb1, program, minibatch, PRECISION)
    hidden_query, gelu_grad_query = gelu_tanh(z1_query)
    w1_tile, b1_tile, w2_tile = tiles
    return HiddenTile(
        w1_tile, b1_tile, w2_tile, w1, b1, w2, sw1, sb1, sw2, z1_key, hidden_key, gelu_grad_key, hidden_grad,
        grad1, hidden_query, gelu_grad_query,
    )  # fmt: skip


@triton.jit
def hidden_tile_sums(tile, minibatch, grad2_lr, PRECISION: tl.constexpr):
    """The tile's sums at the end of the mini-batch: S + sum_j lr_j [x_j; 1]^T g_j for both layers'
    tiles (S_W1, S_b1, S_W2)."""
    grad1_lr = tile.grad1 * minibatch.lr[:, None]
    return (
        tile.sw1 + tl.dot(tl.trans(minibatch.k), grad1_lr, input_precision=PRECISION),
        tile.sb1 + tl.sum(grad1_lr, axis=0),
        tile.sw2 + tl.dot(tl.trans(tile.hidden_key), grad2_lr, input_precision=PRECISION),
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
def mlp_query_pass(
    minibatch, program, weights, sums, grad2, query_key, targets, dims, UPDATE: tl.constexpr,
    STORE_CHECKPOINTS: tl.constexpr, BLOCK_T, BLOCK_D, BLOCK_H: tl.constexpr, COMPUTE, PRECISION,
):  # fmt: skip
    """Pass 2 of a mini-batch, one ``hidden_tile`` at a time: the queries through layer 1's dual form
    and what layer 2's dual form sums over the tiles, returned: Xbar2 W2 - tau Xbar2 S_W2 and the
    hidden query-key products Xbar2 X2^T. With UPDATE (the forward kernel), also each tile's update,
    written to targets: for W1, b1 and W2 each, the pointers (weight, sums, checkpoints)."""
    grad2_lr = grad2 * minibatch.lr[:, None]
    z_query = tl.zeros([BLOCK_T, BLOCK_D], dtype=COMPUTE)
    hidden_query_key = tl.zeros([BLOCK_T, BLOCK_T], dtype=COMPUTE)
    for start in range(0, dims.hidden_dim, BLOCK_H):
        tile = hidden_tile(
            minibatch, program, weights, sums, start, grad2, query_key, dims, BLOCK_D, BLOCK_H, PRECISION
        )
        z_query += dual_form_partial(tile.hidden_query, tile.w2, tile.sw2, program, minibatch, PRECISION)
        hidden_query_key += tl.dot(tile.hidden_query, tl.trans(tile.hidden_key), input_precision=PRECISION)
        if UPDATE:
            w1_targets, b1_targets, w2_targets = targets
            sw1, sb1, sw2 = hidden_tile_sums(tile, minibatch, grad2_lr, PRECISION)
            every = dims.checkpoint_every
            _write_update(
                w1_targets, tile.w1_tile, tile.w1, sw1, program, minibatch, every, STORE_CHECKPOINTS
            )
            _write_update(
                b1_targets, tile.b1_tile, tile.b1, sb1, program, minibatch, every, STORE_CHECKPOINTS
            )
            _write_update(
                w2_targets, tile.w2_tile, tile.w2, sw2, program, minibatch, every, STORE_CHECKPOINTS
            )
    return z_query, hidden_query_key


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
    weights = (w1_src, b1_src, w2_src, b2_src)
    b2_tile = vector_tile(program.state_row, tl.arange(0, BLOCK_D), dims.head_dim)

    # pass 1: the keys' forward through both layers, for the loss gradient at the last layer
    z_key, b2 = mlp_key_output(
        minibatch, program, weights, dims, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE, PRECISION
    )
    grad2 = ln_fused_l2_grad(z_key, minibatch.v - minibatch.k, program, minibatch, dims, BLOCK_D)

    # pass 2, per hidden tile: the hidden gradient, the dual form of layer 1, its share of layer 2's
    # dual form, and the tile's update
    query_key = tl.dot(minibatch.q, tl.trans(minibatch.k), input_precision=PRECISION)
    targets = ((w1_dst, sw1_dst, w1_ckpt), (b1_dst, sb1_dst, b1_ckpt), (w2_dst, sw2_dst, w2_ckpt))
    z_query, hidden_query_key = mlp_query_pass(
        minibatch, program, weights, (sw1_src, sb1_src, sw2_src), grad2, query_key, targets, dims, True,
        STORE_CHECKPOINTS, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE, PRECISION,
    )  # fmt: skip

    sb2 = tl.load(sb2_src + b2_tile.offsets, mask=mask_if(b2_tile.mask, minibatch.first), other=0.0)
    z_query = dual_form_finish(z_query, hidden_query_key, grad2, b2, sb2, program, minibatch, PRECISION)
    store_output(o_ptr, minibatch, z_query, program, dims, BLOCK_D)
    sb2_end = sb2 + tl.sum(grad2 * minibatch.lr[:, None], axis=0)
    _write_update(
        (b2_dst, sb2_dst, b2_ckpt), b2_tile, b2, sb2_end, program, minibatch, dims.checkpoint_every,
        STORE_CHECKPOINTS,
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
