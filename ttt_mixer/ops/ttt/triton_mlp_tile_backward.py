"""The backward of one hidden tile of a TTT-MLP mini-batch, for the fused backward kernel
(``triton_mlp_backward``, which runs the passes; the derivation: docs/math.md section 14): pass 3,
back through everything but the keys' path through Z2, and pass 4, that path once dZ2 is whole.
Each tile's part of dZ1 waits in a scratch buffer [N, H, b, 4d] from pass 3 to pass 4.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ttt_mixer.ops.ttt.triton_backward import (
    layer_dual_form_backward,
    layer_update_backward,
    sums_read_backward,
    weight_update_backward,
)
from ttt_mixer.ops.ttt.triton_helpers import gelu_tanh, gelu_tanh_second, matrix_tile
from ttt_mixer.ops.ttt.triton_mlp import hidden_tiles, load_hidden_tiles, store_hidden_tiles


@triton.jit
def hidden_grad_tile(program, start, dims, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Where hidden units start .. start + BLOCK_H of the program's part of the [N, H, b, 4d] scratch
    for dZ1 lie."""
    cells = tl.arange(0, BLOCK_T)
    units = start + tl.arange(0, BLOCK_H)
    return matrix_tile(program.state_row, cells, units, dims.mini_batch_size, dims.hidden_dim)


@triton.jit
def hidden_tile_backward(
    tile, minibatch, program, grad2, grad2_lr, d_z_query, d_hidden_query_key, scores1, grad_end, grad_start,
    hidden_grad_ptr, grad_tile, PRECISION: tl.constexpr,
):  # fmt: skip
    """Pass 3 for one hidden tile: back through the update at the mini-batch's end, both layers' dual
    forms and g1 = (g2 W2^T) gelu'(Z1), from dZbar2 and d(Xbar2 X2^T). Writes the tile's gradients of
    the state before the mini-batch (all but the keys' path through Z2, which pass 4 adds) and its part
    of dZ1; returns its shares of dQ, dK, dlr, dtau, dtau_b, dg2, d(lr g2) and d(scores of layer 1)."""
    q, k = minibatch.q, minibatch.k
    tiles = (tile.w1_tile, tile.b1_tile, tile.w2_tile)
    d_w1_end, d_b1_end, d_w2_end = load_hidden_tiles(grad_end[0], grad_end[1], grad_end[2], tiles, True)
    d_sw1_end, d_sb1_end, d_sw2_end = load_hidden_tiles(grad_end[4], grad_end[5], grad_end[6], tiles, True)

    # S_end = S + sum_j lr_j [x_j; 1]^T g_j and the update at the end, for both layers' parts of the tile
    d_sums1, d_tau_last, d_k, d_lr, d_grad1 = layer_update_backward(
        k, tile.grad1, (tile.sw1, tile.sb1), (d_w1_end, d_b1_end, d_sw1_end, d_sb1_end), program, minibatch,
        PRECISION,
    )  # fmt: skip
    d_sw2, d_tau_last_w2, d_grad2_lr, d_hidden_key = weight_update_backward(
        tile.hidden_key, grad2_lr, tile.sw2, d_w2_end, d_sw2_end, program, minibatch, PRECISION
    )

    # Zbar2 = Xbar2 W2 + b2 - tau (Xbar2 S_W2 + S_b2) - (eta * (Xbar2 X2^T + 1)) g2, its tile's share
    d_hidden_query = tl.dot(d_z_query, tl.trans(tile.w2), input_precision=PRECISION)
    d_hidden_query += tl.dot(d_hidden_query_key, tile.hidden_key, input_precision=PRECISION)
    d_hidden_key += tl.dot(tl.trans(d_hidden_query_key), tile.hidden_query, input_precision=PRECISION)
    d_w2 = d_w2_end + tl.dot(tl.trans(tile.hidden_query), d_z_query, input_precision=PRECISION)
    d_tau = tl.zeros_like(d_lr)
    if minibatch.first:
        d_hidden_query_read, d_sw2_read, d_tau = sums_read_backward(
            d_z_query, tile.hidden_query, tile.sw2, program, PRECISION
        )
        d_hidden_query += d_hidden_query_read
        d_sw2 += d_sw2_read

    # Xbar2 = gelu(Zbar1), Zbar1 = Q W1 + b1 - tau (Q S_W1 + S_b1) - scores1 g1
    d_q, d_weights1, d_grad1_layer, d_scores1, d_sums1_read, d_tau_layer = layer_dual_form_backward(
        d_hidden_query * tile.gelu_grad_query, q, tile.w1, tile.grad1, scores1, (tile.sw1, tile.sb1), program,
        minibatch, PRECISION,
    )  # fmt: skip
    d_tau += d_tau_layer

    # g1 = (g2 W2^T) * gelu'(Z1) and X2 = gelu(Z1)
    d_grad1 = tl.where(minibatch.real[:, None], d_grad1 + d_grad1_layer, 0.0)
    d_hidden_grad = d_grad1 * tile.gelu_grad_key
    d_grad2 = tl.dot(d_hidden_grad, tile.w2, input_precision=PRECISION)
    d_w2 += tl.dot(tl.trans(d_hidden_grad), grad2, input_precision=PRECISION)
    d_z1_key = d_grad1 * tile.hidden_grad * gelu_tanh_second(tile.z1_key) + d_hidden_key * tile.gelu_grad_key

    tl.store(hidden_grad_ptr + grad_tile.offsets, d_z1_key, mask=grad_tile.mask)
    d_weights = (d_w1_end + d_weights1[0], d_b1_end + d_weights1[1], d_w2)
    store_hidden_tiles(grad_start[0], grad_start[1], grad_start[2], tiles, d_weights)
    d_sums = (d_sums1[0] + d_sums1_read[0], d_sums1[1] + d_sums1_read[1], d_sw2)
    store_hidden_tiles(grad_start[4], grad_start[5], grad_start[6], tiles, d_sums)
    return d_q, d_k, d_lr, d_tau, d_tau_last + d_tau_last_w2, d_grad2, d_grad2_lr, d_scores1


@triton.jit
def key_tile_backward(
    minibatch, program, weights, start, d_z_key, grad_start, hidden_grad_ptr, dims, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Pass 4 for one hidden tile, once dZ2 is whole: back through Z2 = X2 W2 + b2 and Z1 = K W1 + b1.
    Adds to the tile's gradients of W1, b1 and W2 and returns its share of dK."""
    k = minibatch.k
    tiles = hidden_tiles(program.state_row, start, dims, BLOCK_D, BLOCK_H)
    w1, b1, w2 = load_hidden_tiles(weights[0], weights[1], weights[2], tiles, True)
    hidden_key, gelu_grad_key = gelu_tanh(tl.dot(k, w1, input_precision=PRECISION) + b1[None, :])
    grad_tile = hidden_grad_tile(program, start, dims, BLOCK_T, BLOCK_H)
    d_z1_key = tl.load(hidden_grad_ptr + grad_tile.offsets, mask=grad_tile.mask, other=0.0)
    d_z1_key += tl.dot(d_z_key, tl.trans(w2), input_precision=PRECISION) * gelu_grad_key
    d_w1, d_b1, d_w2 = load_hidden_tiles(grad_start[0], grad_start[1], grad_start[2], tiles, True)
    d_w1 += tl.dot(tl.trans(k), d_z1_key, input_precision=PRECISION)
    d_b1 += tl.sum(d_z1_key, axis=0)
    d_w2 += tl.dot(tl.trans(hidden_key), d_z_key, input_precision=PRECISION)
    store_hidden_tiles(grad_start[0], grad_start[1], grad_start[2], tiles, (d_w1, d_b1, d_w2))
    return tl.dot(d_z1_key, tl.trans(w1), input_precision=PRECISION)
