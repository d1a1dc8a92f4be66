"""What the fused Triton backward kernels of TTT-Linear (``triton_linear_backward``) and TTT-MLP
(``triton_mlp_backward``) share: their argument groups, the slots of checkpoint-like buffers, the walk
over segments, and the backward of the pieces of the dual form that every inner layer has (the
derivation: docs/math.md section 14).

Both kernels run one program per (sequence, head) that walks its sequence's segments of
``checkpoint_every`` mini-batches from last to first: it replays the forward over a segment from the
segment's start weights (the initial state for the first segment, a checkpoint of the forward for the
others) into a scratch buffer, then back-propagates through the segment's mini-batches in reverse.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ttt_mixer.ops.ttt.triton_helpers import causal, mask_if, normalize, normalize_backward, vector_tile


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
    """The weights the backward replays from, each a tuple of pointers: initial, the initial state
    (W_1, b_1, [W_2, b_2,] S_W_1, S_b_1, [S_W_2, S_b_2]) [N, H, ...]; checkpoints, the forward's
    (W_1, b_1, [W_2, b_2]) [num_checkpoints, N, H, ...]; scratch, the same weights
    [checkpoint_every, N, H, ...] for the mini-batches of one segment (TTT-MLP's adds a buffer for
    its hidden layer's gradient, [N, H, b, 4d])."""

    initial: tuple
    checkpoints: tuple
    scratch: tuple


@triton.jit
def slot_load(ptr, tile, slot, condition):
    """The tile in slot ``slot`` of a checkpoint-like [slots, N, H, ...] tensor where the scalar
    condition holds, else zeros."""
    return tl.load(
        ptr + slot * tile.slot_stride + tile.offsets, mask=mask_if(tile.mask, condition), other=0.0
    )


@triton.jit
def slot_store(ptr, tile, slot, value):
    """The inverse of ``slot_load``."""
    tl.store(ptr + slot * tile.slot_stride + tile.offsets, value, mask=tile.mask)


@triton.jit
def segment_bounds(program, segment_from_end, dims):
    """The mini-batches first .. end - 1 of the program's segment ``segment_from_end`` counted from its
    last (segment 0 of the sequence starts at mini-batch 0)."""
    every = dims.checkpoint_every
    num_segments = (program.num_minibatches + every - 1) // every
    first = (num_segments - 1 - segment_from_end) * every
    return first, tl.minimum(first + every, program.num_minibatches)


@triton.jit
def num_segments(program, dims):
    """Segments of checkpoint_every mini-batches covering the program's sequence."""
    return (program.num_minibatches + dims.checkpoint_every - 1) // dims.checkpoint_every


@triton.jit
def sums_end_backward(sums_end, d_weight_end, d_sums_after, program, minibatch):
    """Back through the end of a mini-batch for one weight (matrix or bias) whose sums end at S_end: a
    complete one gives W+ = W - tau_b S_end and S+ = 0 (a constant), else S+ = S_end. Returns dS_end
    and the share of dtau_b."""
    complete = minibatch.complete
    d_sums_end = tl.where(complete, -program.tau_last * d_weight_end, d_sums_after)
    d_tau_last = tl.where(complete, -tl.sum(sums_end * d_weight_end), 0.0)
    return d_sums_end, d_tau_last


@triton.jit
def weight_update_backward(
    x_key, grad_lr, sums, d_weight_end, d_sums_after, program, minibatch, PRECISION: tl.constexpr
):
    """Back through S_end = S + X^T (lr g) and the mini-batch's end for a weight matrix whose keys'
    inputs are X: returns dS_end, the share of dtau_b, and the shares of d(lr g) and dX."""
    sums_end = sums + tl.dot(tl.trans(x_key), grad_lr, input_precision=PRECISION)
    d_sums_end, d_tau_last = sums_end_backward(sums_end, d_weight_end, d_sums_after, program, minibatch)
    d_grad_lr = tl.dot(x_key, d_sums_end, input_precision=PRECISION)
    d_x_key = tl.dot(grad_lr, tl.trans(d_sums_end), input_precision=PRECISION)
    return d_sums_end, d_tau_last, d_grad_lr, d_x_key


@triton.jit
def bias_update_backward(grad_lr, sums, d_bias_end, d_sums_after, program, minibatch):
    """``weight_update_backward`` for a bias (inputs 1): returns dS_end, which is also every row's share
    of d(lr g), and the share of dtau_b."""
    sums_end = sums + tl.sum(grad_lr, axis=0)
    return sums_end_backward(sums_end, d_bias_end, d_sums_after, program, minibatch)


@triton.jit
def sums_read_backward(d_z, x_query, sums, program, PRECISION: tl.constexpr):
    """Back through -tau_i x_i S_W, the first mini-batch's read of the sums of the tokens before the
    call: returns the shares of dX, dS_W and dtau."""
    tau_d_z = program.tau_rows[:, None] * d_z
    d_x = -tl.dot(tau_d_z, tl.trans(sums), input_precision=PRECISION)
    d_sums = -tl.dot(tl.trans(x_query), tau_d_z, input_precision=PRECISION)
    d_tau = -tl.sum(d_z * tl.dot(x_query, sums, input_precision=PRECISION), axis=1)
    return d_x, d_sums, d_tau


@triton.jit
def bias_sums_read_backward(d_z, sums, program):
    """``sums_read_backward`` for a bias: the shares of dS_b and dtau."""
    d_sums = -tl.sum(program.tau_rows[:, None] * d_z, axis=0)
    return d_sums, -tl.sum(d_z * sums[None, :], axis=1)


@triton.jit
def layer_update_backward(x_key, grad, sums, grad_end, program, minibatch, PRECISION: tl.constexpr):
    """``weight_update_backward`` and ``bias_update_backward`` for a layer's weight and bias together,
    sums = (S_W, S_b), grad_end = (dW+, db+, dS_W+, dS_b+): returns (dS_W_end, dS_b_end), the share of
    dtau_b, and the shares of dX, dlr and dg."""
    sum_w, sum_b = sums
    d_weight_end, d_bias_end, d_sum_w_after, d_sum_b_after = grad_end
    lr = minibatch.lr[:, None]
    d_sum_w, d_tau_last, d_grad_lr, d_x = weight_update_backward(
        x_key, grad * lr, sum_w, d_weight_end, d_sum_w_after, program, minibatch, PRECISION
    )
    d_sum_b, d_tau_last_bias = bias_update_backward(
        grad * lr, sum_b, d_bias_end, d_sum_b_after, program, minibatch
    )
    d_grad_lr += d_sum_b[None, :]
    d_lr = tl.sum(grad * d_grad_lr, axis=1)
    return (d_sum_w, d_sum_b), d_tau_last + d_tau_last_bias, d_x, d_lr, lr * d_grad_lr


@triton.jit
def layer_dual_form_backward(
    d_z, x_query, weight, grad, scores, sums, program, minibatch, PRECISION: tl.constexpr
):
    """Back through a layer's dual form Zbar = X W + b - tau (X S_W + S_b) - scores g but for the
    scores' own backward (``scores_backward``, from the d scores returned here, unmasked), sums =
    (S_W, S_b), read in the call's first mini-batch only. Returns the shares of dX, (dW, db), dg,
    d scores, (dS_W, dS_b) and dtau."""
    sum_w, sum_b = sums
    d_x = tl.dot(d_z, tl.trans(weight), input_precision=PRECISION)
    d_weights = (tl.dot(tl.trans(x_query), d_z, input_precision=PRECISION), tl.sum(d_z, axis=0))
    d_grad = -tl.dot(tl.trans(scores), d_z, input_precision=PRECISION)
    d_scores = -tl.dot(d_z, tl.trans(grad), input_precision=PRECISION)
    d_sum_w = tl.zeros_like(sum_w)
    d_sum_b = tl.zeros_like(sum_b)
    d_tau = tl.zeros_like(minibatch.lr)
    if minibatch.first:
        d_x_read, d_sum_w, d_tau = sums_read_backward(d_z, x_query, sum_w, program, PRECISION)
        d_sum_b, d_tau_bias = bias_sums_read_backward(d_z, sum_b, program)
        d_x += d_x_read
        d_tau += d_tau_bias
    return d_x, d_weights, d_grad, d_scores, (d_sum_w, d_sum_b), d_tau


@triton.jit
def last_cell_share(d_tau_last, dims, BLOCK_T: tl.constexpr):
    """dtau_b as a [BLOCK_T] gradient of tau: in the last cell of the mini-batch."""
    return tl.where(tl.arange(0, BLOCK_T) == dims.mini_batch_size - 1, d_tau_last, 0.0)


@triton.jit
def output_backward(token_grads, minibatch, z_query, program, dims, BLOCK_D: tl.constexpr):
    """Back through o = q + LN(Zbar): returns dO (also dQ's share), dZbar and the shares of
    dln_weight and dln_bias."""
    col_valid = tl.arange(0, BLOCK_D) < dims.head_dim
    z_hat, rstd = normalize(z_query, col_valid, dims.head_dim, program.eps)
    d_o = tl.load(token_grads.o + minibatch.tile, mask=minibatch.mask, other=0.0).to(z_query.dtype)
    d_z = normalize_backward(d_o * program.ln_weight[None, :], z_hat, rstd, col_valid, dims.head_dim)
    return d_o, d_z, tl.sum(d_o * z_hat, axis=0), tl.sum(d_o, axis=0)


@triton.jit
def scores_backward(d_scores, query_key, minibatch, program, BLOCK_T: tl.constexpr):
    """Back through a layer's scores P = eta * (query_key + 1) (lower triangle) from dP (what lies
    above the diagonal is ignored): returns d query_key and the shares of dtau and dlr."""
    d_scores = tl.where(causal(BLOCK_T), d_scores, 0.0)
    d_eta = d_scores * (query_key + 1.0)
    d_tau = tl.sum(d_eta * minibatch.lr[None, :], axis=1)
    d_lr = tl.sum(d_eta * program.tau_rows[:, None], axis=0)
    return d_scores * minibatch.eta, d_tau, d_lr


@triton.jit
def store_token_grads(token_grads, minibatch, d_q, d_k, d_v, d_lr):
    """The gradients of the mini-batch's real tokens."""
    tl.store(token_grads.q + minibatch.tile, d_q, mask=minibatch.mask)
    tl.store(token_grads.k + minibatch.tile, d_k, mask=minibatch.mask)
    tl.store(token_grads.v + minibatch.tile, d_v, mask=minibatch.mask)
    tl.store(token_grads.lr + minibatch.rows, d_lr, mask=minibatch.real)


@triton.jit
def no_shared_grads(BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr):
    """A program's shares of the gradients w.r.t. tau [BLOCK_T], ln_weight and ln_bias [BLOCK_D] before
    its first mini-batch: zeros."""
    return (
        tl.zeros([BLOCK_T], dtype=COMPUTE),
        tl.zeros([BLOCK_D], dtype=COMPUTE),
        tl.zeros([BLOCK_D], dtype=COMPUTE),
    )


@triton.jit
def add_shared_grads(total, share):
    """The shares of ``no_shared_grads`` plus a mini-batch's."""
    return total[0] + share[0], total[1] + share[1], total[2] + share[2]


@triton.jit
def store_shared_grads(shared_grads, program, shares, dims, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program's shares of the gradients of tau, ln_weight and ln_bias."""
    d_tau, d_ln_weight, d_ln_bias = shares
    tau_tile = vector_tile(program.state_row, tl.arange(0, BLOCK_T), dims.mini_batch_size)
    col_tile = vector_tile(program.state_row, tl.arange(0, BLOCK_D), dims.head_dim)
    tl.store(shared_grads.tau + tau_tile.offsets, d_tau, mask=tau_tile.mask)
    tl.store(shared_grads.ln_weight + col_tile.offsets, d_ln_weight, mask=col_tile.mask)
    tl.store(shared_grads.ln_bias + col_tile.offsets, d_ln_bias, mask=col_tile.mask)
