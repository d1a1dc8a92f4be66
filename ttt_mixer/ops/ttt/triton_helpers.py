"""Triton kernels of the TTT forward pass (SPEC.md sections 4-6), one program per (sequence, head).

A program walks its sequence's mini-batches in order. Mini-batches are aligned to the sequence's own
first token and continue from its state's position p (mini-batch m covers token offsets
[m b - p, (m + 1) b - p)); cells outside the sequence read zero inputs and a zero learning rate, so
they change nothing. Per mini-batch (K, V, Q [b, d], lr [b], tau [b], eta_ij = tau_i lr_j, j <= i):

    g = dl/dZ at W for every key (LayerNorm backward fused with the L2 loss, target V - K)
    Zbar_i = Q_i W + b - tau_i (Q_i S_W + S_b) - sum_{j<=i} eta_ij (Q_i . K_j + 1) g_j,  o = Q + LN(Zbar)
    S_end = S + sum_j lr_j [K_j; 1]^T g_j;  complete mini-batch: W <- W - tau_b S_end, S <- 0

TTT-MLP applies the same dual form to both layers; the hidden layer's gradient flows back through W2
and gelu'. Only the first mini-batch of a call can start with non-zero accumulators S (a state read
in the middle of a mini-batch): every later one starts after a complete mini-batch. The kernels peel
that first mini-batch (``HAS_SUMS``) so that the others skip the accumulator terms.

Where the state lives:
- TTT-Linear keeps W, b, S_W, S_b in registers across all mini-batches.
- TTT-MLP tiles the hidden dimension (4d) by ``BLOCK_H`` and keeps the weights in the output state
  buffers (L2-resident), streaming tiles through registers twice per mini-batch: once for the
  forward of the keys (the loss gradient needs the whole hidden layer), once for everything else.
  The first mini-batch reads the input state and writes the output state, so the input is never
  modified and a kernel run can be repeated (autotuning does).

Optionally (``STORE_CHECKPOINTS``) the weights at the start of every ``checkpoint_every``-th
mini-batch are stored for the backward pass (``ttt_mixer.ops.triton_ttt``); at such a boundary the
accumulators are zero and the position is 0, so the weights are the whole state.

Block sizes: ``tl.dot`` needs every dim >= 16 on a GPU, so BLOCK_T = max(16, next_pow2(b)) and
BLOCK_D = max(16, next_pow2(d)), with masks; b and d need not be powers of two. Everything is
accumulated in ``COMPUTE`` (float32, or float64 for float64 inputs); inputs may be 16-bit. Matrix
products use 3xTF32 for float32 inputs, TF32 for 16-bit ones (see ``_DOT_PRECISION``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ttt_mixer.ops.common import InnerModel

# Autotuning needs a GPU: in the interpreter every kernel runs its first config.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)

_LINEAR_CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8, 2)]
# wider hidden tiles spill registers at d = 64 (and take long to compile)
_MLP_CONFIGS = [triton.Config({"BLOCK_H": h}, num_warps=w) for h in (32, 16) for w in (4, 8)]
_TORCH_TO_TRITON = {torch.float32: tl.float32, torch.float64: tl.float64}
# tl.dot on float32 state: 3xTF32 keeps float32 inputs near float32 accuracy on tensor cores (plain
# float32 FMA dots spill registers badly); 16-bit inputs round more than TF32 does; float64 is exact.
_DOT_PRECISION = {
    torch.float64: "ieee",
    torch.float32: "tf32x3",
    torch.bfloat16: "tf32",
    torch.float16: "tf32",
}


# Shared pieces -------------------------------------------------------------------------------------


@triton.jit
def _gelu_tanh(x):
    """gelu(x, approximate='tanh') and its derivative (gelu_tanh_grad of common.py)."""
    u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    # tanh(u) from exp(-2|u|), which cannot overflow
    decay = tl.exp(-2.0 * tl.abs(u))
    tanh = (1.0 - decay) / (1.0 + decay)
    tanh = tl.where(u < 0, -tanh, tanh)
    value = 0.5 * x * (1.0 + tanh)
    grad = 0.5 * (1.0 + tanh) + 0.5 * x * (1.0 - tanh * tanh) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return value, grad


@triton.jit
def _load_minibatch(
    q_ptr,
    k_ptr,
    v_ptr,
    lr_ptr,
    seq_start,
    seq_len,
    position,
    minibatch,
    head,
    num_heads,
    head_dim,
    mini_batch_size,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Queries, keys, values [BLOCK_T, BLOCK_D] and learning rates [BLOCK_T] of one mini-batch of one
    sequence and head (zeros outside the sequence), the mask of its real tokens [BLOCK_T], and the
    offsets and mask of its [BLOCK_T, BLOCK_D] tile in the [B, T, H, d] layout."""
    cells = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    offset = minibatch * mini_batch_size + cells - position
    real = (cells < mini_batch_size) & (offset >= 0) & (offset < seq_len)
    token = seq_start + offset
    tile = (token * num_heads + head)[:, None] * head_dim + cols[None, :]
    mask = real[:, None] & (cols < head_dim)[None, :]
    q = tl.load(q_ptr + tile, mask=mask, other=0.0).to(COMPUTE)
    k = tl.load(k_ptr + tile, mask=mask, other=0.0).to(COMPUTE)
    v = tl.load(v_ptr + tile, mask=mask, other=0.0).to(COMPUTE)
    lr = tl.load(lr_ptr + token * num_heads + head, mask=real, other=0.0).to(COMPUTE)
    return q, k, v, lr, real, tile, mask


@triton.jit
def _normalize(z, col_valid, head_dim, eps):
    """(z - mean) / std over the head_dim valid columns of every row, and 1 / std."""
    z = tl.where(col_valid[None, :], z, 0.0)
    mean = tl.sum(z, axis=1) / head_dim
    centered = tl.where(col_valid[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / head_dim + eps)
    return centered * rstd[:, None], rstd


@triton.jit
def _ln_fused_l2_grad(z, target, ln_weight, ln_bias, real, col_valid, head_dim, eps):
    """d/dz of 1/2 ||LN(z) - target||^2 (ln_fused_l2_grad of common.py), zero outside the real
    tokens and columns so that padding never reaches the accumulators."""
    z_hat, rstd = _normalize(z, col_valid, head_dim, eps)
    grad_hat = (ln_weight[None, :] * z_hat + ln_bias[None, :] - target) * ln_weight[None, :]
    grad = (
        head_dim * grad_hat
        - tl.sum(grad_hat, axis=1)[:, None]
        - z_hat * tl.sum(grad_hat * z_hat, axis=1)[:, None]
    ) * (rstd / head_dim)[:, None]
    return tl.where(real[:, None] & col_valid[None, :], grad, 0.0)


@triton.jit
def _store_output(o_ptr, tile, mask, q, z, ln_weight, ln_bias, col_valid, head_dim, eps):
    """o = q + LN(z) for the real tokens, in the output's dtype."""
    z_hat, _ = _normalize(z, col_valid, head_dim, eps)
    tl.store(o_ptr + tile, q + ln_weight[None, :] * z_hat + ln_bias[None, :], mask=mask)


@triton.jit
def _step_sizes(tau_rows, lr, BLOCK_T: tl.constexpr):
    """eta[i, j] = tau_i lr_j for j <= i: the step applied to query i from key j (SPEC.md section 2)."""
    cells = tl.arange(0, BLOCK_T)
    return tl.where(cells[:, None] >= cells[None, :], tau_rows[:, None] * lr[None, :], 0.0)


@triton.jit
def _dual_form_partial(x_query, weight, sums, tau_rows, HAS_SUMS: tl.constexpr, PRECISION: tl.constexpr):
    """x_i W - tau_i x_i S_W: the part of a layer's dual form that sums over the layer's inputs (the
    MLP's second layer accumulates it over hidden tiles)."""
    z = tl.dot(x_query, weight, input_precision=PRECISION)
    if HAS_SUMS:
        z -= tau_rows[:, None] * tl.dot(x_query, sums, input_precision=PRECISION)
    return z


@triton.jit
def _dual_form_finish(
    z, query_key, grad, bias, sum_bias, tau_rows, eta, HAS_SUMS: tl.constexpr, PRECISION: tl.constexpr
):
    """Zbar_i = z_i + b - tau_i S_b - sum_{j<=i} eta_ij (x_i . k_j + 1) grad_j, from the partial z
    above and query_key[i, j] = x_i . k_j (the layer's query and key inputs)."""
    z += bias[None, :]
    if HAS_SUMS:
        z -= tau_rows[:, None] * sum_bias[None, :]
    return z - tl.dot((query_key + 1.0) * eta, grad, input_precision=PRECISION)


@triton.jit
def _mask_if(mask, condition):
    """mask where the scalar condition holds, else all false (tl.where rather than &: the interpreter
    mis-types a scalar boolean broadcast by &)."""
    return tl.where(condition, mask, False)


@triton.jit
def _apply_update(weight, sums_end, tau_last, complete):
    """End of a mini-batch: a complete one moves W to W - tau_b S and clears S; else W waits and S
    carries over."""
    return tl.where(complete, weight - tau_last * sums_end, weight), tl.where(complete, 0.0, sums_end)


@triton.jit
def _store_checkpoint(ckpt_ptr, offsets, mask, slot_stride, weight, minibatch, complete, checkpoint_every):
    """After mini-batch m, keep the weights that start mini-batch m + 1 when m + 1 is a multiple of
    checkpoint_every, in slot (m + 1) / checkpoint_every - 1."""
    next_minibatch = minibatch + 1
    # slot_stride is int64; the slot may be a compile-time constant (Triton specializes ints equal to 1)
    slot = next_minibatch // checkpoint_every - 1
    due = complete & (next_minibatch % checkpoint_every == 0)
    tl.store(ckpt_ptr + slot * slot_stride + offsets, weight, mask=_mask_if(mask, due))


# TTT-Linear ----------------------------------------------------------------------------------------


@triton.jit
def _program_setup(
    seq_start_ptr,
    seq_len_ptr,
    position_ptr,
    ln_weight_ptr,
    ln_bias_ptr,
    tau_ptr,
    head_dim,
    mini_batch_size,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """What every forward program reads first: its sequence and head, the sequence's bounds and
    start position, its mini-batch count, the head's inner LayerNorm and the token scales."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_start = tl.load(seq_start_ptr + seq)
    seq_len = tl.load(seq_len_ptr + seq)
    position = tl.load(position_ptr + seq)
    num_minibatches = (position + seq_len + mini_batch_size - 1) // mini_batch_size
    cols = tl.arange(0, BLOCK_D)
    col_valid = cols < head_dim
    ln_weight = tl.load(ln_weight_ptr + head * head_dim + cols, mask=col_valid, other=0.0).to(COMPUTE)
    ln_bias = tl.load(ln_bias_ptr + head * head_dim + cols, mask=col_valid, other=0.0).to(COMPUTE)
    cells = tl.arange(0, BLOCK_T)
    tau_rows = tl.load(tau_ptr + cells, mask=cells < mini_batch_size, other=0.0).to(COMPUTE)
    tau_last = tl.load(tau_ptr + mini_batch_size - 1).to(COMPUTE)
    return (
        seq,
        head,
        seq_start,
        seq_len,
        position,
        num_minibatches,
        cols,
        col_valid,
        ln_weight,
        ln_bias,
        tau_rows,
        tau_last,
    )


@triton.jit
def _linear_minibatch(
    q_ptr,
    k_ptr,
    v_ptr,
    lr_ptr,
    o_ptr,
    w_ckpt_ptr,
    b_ckpt_ptr,
    weight,
    bias,
    sum_w,
    sum_b,
    ln_weight,
    ln_bias,
    tau_rows,
    tau_last,
    seq_start,
    seq_len,
    position,
    minibatch,
    head,
    num_heads,
    head_dim,
    mini_batch_size,
    w_offsets,
    w_mask,
    b_offsets,
    w_slot_stride,
    b_slot_stride,
    checkpoint_every,
    eps,
    HAS_SUMS: tl.constexpr,
    STORE_CHECKPOINTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One mini-batch of TTT-Linear with the state in registers; returns the state after it."""
    q, k, v, lr, real, tile, mask = _load_minibatch(
        q_ptr, k_ptr, v_ptr, lr_ptr, seq_start, seq_len, position, minibatch, head,
        num_heads, head_dim, mini_batch_size, BLOCK_T, BLOCK_D, COMPUTE,
    )  # fmt: skip
    col_valid = tl.arange(0, BLOCK_D) < head_dim
    eta = _step_sizes(tau_rows, lr, BLOCK_T)
    z_key = tl.dot(k, weight, input_precision=PRECISION) + bias[None, :]
    grad = _ln_fused_l2_grad(z_key, v - k, ln_weight, ln_bias, real, col_valid, head_dim, eps)
    z_query = _dual_form_partial(q, weight, sum_w, tau_rows, HAS_SUMS, PRECISION)
    query_key = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    z_query = _dual_form_finish(z_query, query_key, grad, bias, sum_b, tau_rows, eta, HAS_SUMS, PRECISION)
    _store_output(o_ptr, tile, mask, q, z_query, ln_weight, ln_bias, col_valid, head_dim, eps)

    grad_lr = grad * lr[:, None]
    sum_w_end = tl.dot(tl.trans(k), grad_lr, input_precision=PRECISION)
    sum_b_end = tl.sum(grad_lr, axis=0)
    if HAS_SUMS:
        sum_w_end += sum_w
        sum_b_end += sum_b
    complete = (minibatch + 1) * mini_batch_size - position <= seq_len
    weight, sum_w = _apply_update(weight, sum_w_end, tau_last, complete)
    bias, sum_b = _apply_update(bias, sum_b_end, tau_last, complete)
    if STORE_CHECKPOINTS:
        _store_checkpoint(
            w_ckpt_ptr, w_offsets, w_mask, w_slot_stride, weight, minibatch, complete, checkpoint_every
        )
        _store_checkpoint(
            b_ckpt_ptr, b_offsets, col_valid, b_slot_stride, bias, minibatch, complete, checkpoint_every
        )
    return weight, bias, sum_w, sum_b


@triton.jit
def ttt_linear_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lr_ptr,
    o_ptr,
    tau_ptr,
    ln_weight_ptr,
    ln_bias_ptr,
    seq_start_ptr,
    seq_len_ptr,
    position_ptr,
    w_in_ptr,
    b_in_ptr,
    sw_in_ptr,
    sb_in_ptr,
    w_out_ptr,
    b_out_ptr,
    sw_out_ptr,
    sb_out_ptr,
    w_ckpt_ptr,
    b_ckpt_ptr,
    num_heads,
    head_dim,
    mini_batch_size,
    checkpoint_every,
    eps,
    STORE_CHECKPOINTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    (
        seq,
        head,
        seq_start,
        seq_len,
        position,
        num_minibatches,
        cols,
        col_valid,
        ln_weight,
        ln_bias,
        tau_rows,
        tau_last,
    ) = _program_setup(
        seq_start_ptr,
        seq_len_ptr,
        position_ptr,
        ln_weight_ptr,
        ln_bias_ptr,
        tau_ptr,
        head_dim,
        mini_batch_size,
        BLOCK_T,
        BLOCK_D,
        COMPUTE,
    )

    state = (seq * num_heads + head).to(tl.int64)
    w_offsets = state * head_dim * head_dim + cols[:, None] * head_dim + cols[None, :]
    w_mask = col_valid[:, None] & col_valid[None, :]
    b_offsets = state * head_dim + cols
    b_slot_stride = tl.num_programs(0).to(tl.int64) * num_heads * head_dim
    w_slot_stride = b_slot_stride * head_dim
    weight = tl.load(w_in_ptr + w_offsets, mask=w_mask, other=0.0)
    bias = tl.load(b_in_ptr + b_offsets, mask=col_valid, other=0.0)
    sum_w = tl.load(sw_in_ptr + w_offsets, mask=w_mask, other=0.0)
    sum_b = tl.load(sb_in_ptr + b_offsets, mask=col_valid, other=0.0)

    # the first mini-batch runs even for an empty sequence: it then changes nothing
    weight, bias, sum_w, sum_b = _linear_minibatch(
        q_ptr, k_ptr, v_ptr, lr_ptr, o_ptr, w_ckpt_ptr, b_ckpt_ptr, weight, bias, sum_w, sum_b,
        ln_weight, ln_bias, tau_rows, tau_last, seq_start, seq_len, position, 0, head, num_heads,
        head_dim, mini_batch_size, w_offsets, w_mask, b_offsets, w_slot_stride, b_slot_stride,
        checkpoint_every, eps, True, STORE_CHECKPOINTS, BLOCK_T, BLOCK_D, COMPUTE, PRECISION,
    )  # fmt: skip
    for minibatch in range(1, num_minibatches):
        weight, bias, sum_w, sum_b = _linear_minibatch(
            q_ptr, k_ptr, v_ptr, lr_ptr, o_ptr, w_ckpt_ptr, b_ckpt_ptr, weight, bias, sum_w, sum_b,
            ln_weight, ln_bias, tau_rows, tau_last, seq_start, seq_len, position, minibatch, head,
            num_heads, head_dim, mini_batch_size, w_offsets, w_mask, b_offsets, w_slot_stride,
            b_slot_stride, checkpoint_every, eps, False, STORE_CHECKPOINTS, BLOCK_T, BLOCK_D, COMPUTE,
            PRECISION,
        )  # fmt: skip
    tl.store(w_out_ptr + w_offsets, weight, mask=w_mask)
    tl.store(b_out_ptr + b_offsets, bias, mask=col_valid)
    tl.store(sw_out_ptr + w_offsets, sum_w, mask=w_mask)
    tl.store(sb_out_ptr + b_offsets, sum_b, mask=col_valid)


# TTT-MLP -------------------------------------------------------------------------------------------


@triton.jit
def _hidden_tile(state, start, head_dim, hidden_dim, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Offsets and masks of hidden units start .. start + BLOCK_H: columns of W1 [d, 4d], entries of
    b1 [4d], rows of W2 [4d, d]."""
    cols = tl.arange(0, BLOCK_D)
    units = start + tl.arange(0, BLOCK_H)
    col_valid = cols < head_dim
    unit_valid = units < hidden_dim
    w1_offsets = state * head_dim * hidden_dim + cols[:, None] * hidden_dim + units[None, :]
    b1_offsets = state * hidden_dim + units
    w2_offsets = state * hidden_dim * head_dim + units[:, None] * head_dim + cols[None, :]
    w1_mask = col_valid[:, None] & unit_valid[None, :]
    w2_mask = unit_valid[:, None] & col_valid[None, :]
    return w1_offsets, w1_mask, b1_offsets, unit_valid, w2_offsets, w2_mask


@triton.jit
def _write_update(
    weight_ptr,
    sums_ptr,
    ckpt_ptr,
    offsets,
    mask,
    slot_stride,
    weight,
    sums_end,
    tau_last,
    complete,
    incomplete,
    minibatch,
    checkpoint_every,
    STORE_CHECKPOINTS: tl.constexpr,
):
    """Store one tile of a layer after its mini-batch. The output accumulators start zeroed and a
    complete mini-batch leaves them zero, so only an incomplete one (a sequence's last) writes them."""
    weight, _ = _apply_update(weight, sums_end, tau_last, complete)
    tl.store(weight_ptr + offsets, weight, mask=mask)
    tl.store(sums_ptr + offsets, sums_end, mask=_mask_if(mask, incomplete))
    if STORE_CHECKPOINTS:
        _store_checkpoint(ckpt_ptr, offsets, mask, slot_stride, weight, minibatch, complete, checkpoint_every)


@triton.jit
def _mlp_minibatch(
    q_ptr,
    k_ptr,
    v_ptr,
    lr_ptr,
    o_ptr,
    src_w1,
    src_b1,
    src_w2,
    src_b2,
    src_sw1,
    src_sb1,
    src_sw2,
    src_sb2,
    dst_w1,
    dst_b1,
    dst_w2,
    dst_b2,
    dst_sw1,
    dst_sb1,
    dst_sw2,
    dst_sb2,
    ckpt_w1,
    ckpt_b1,
    ckpt_w2,
    ckpt_b2,
    ln_weight,
    ln_bias,
    tau_rows,
    tau_last,
    seq_start,
    seq_len,
    position,
    minibatch,
    state,
    head,
    num_heads,
    head_dim,
    hidden_dim,
    mini_batch_size,
    w_slot_stride,
    b1_slot_stride,
    b2_slot_stride,
    checkpoint_every,
    eps,
    HAS_SUMS: tl.constexpr,
    STORE_CHECKPOINTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One mini-batch of TTT-MLP: reads the state from src, writes it to dst (the same buffers after
    the first mini-batch of a call), one hidden tile at a time."""
    q, k, v, lr, real, tile, mask = _load_minibatch(
        q_ptr, k_ptr, v_ptr, lr_ptr, seq_start, seq_len, position, minibatch, head,
        num_heads, head_dim, mini_batch_size, BLOCK_T, BLOCK_D, COMPUTE,
    )  # fmt: skip
    cols = tl.arange(0, BLOCK_D)
    col_valid = cols < head_dim
    b2_offsets = state * head_dim + cols
    eta = _step_sizes(tau_rows, lr, BLOCK_T)
    complete = (minibatch + 1) * mini_batch_size - position <= seq_len
    incomplete = (minibatch + 1) * mini_batch_size - position > seq_len

    # pass 1: the keys' forward through both layers, for the loss gradient at the last layer
    z_key = tl.zeros([BLOCK_T, BLOCK_D], dtype=COMPUTE)
    for start in range(0, hidden_dim, BLOCK_H):
        w1_offsets, w1_mask, b1_offsets, unit_valid, w2_offsets, w2_mask = _hidden_tile(
            state, start, head_dim, hidden_dim, BLOCK_D, BLOCK_H
        )
        w1 = tl.load(src_w1 + w1_offsets, mask=w1_mask, other=0.0)
        b1 = tl.load(src_b1 + b1_offsets, mask=unit_valid, other=0.0)
        w2 = tl.load(src_w2 + w2_offsets, mask=w2_mask, other=0.0)
        hidden_key, _ = _gelu_tanh(tl.dot(k, w1, input_precision=PRECISION) + b1[None, :])
        z_key += tl.dot(hidden_key, w2, input_precision=PRECISION)
    b2 = tl.load(src_b2 + b2_offsets, mask=col_valid, other=0.0)
    grad2 = _ln_fused_l2_grad(z_key + b2[None, :], v - k, ln_weight, ln_bias, real, col_valid, head_dim, eps)
    grad2_lr = grad2 * lr[:, None]

    # pass 2, per hidden tile: the hidden gradient, the dual form of layer 1, its share of layer 2's
    # dual form, and the tile's update
    query_key = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    z_query = tl.zeros([BLOCK_T, BLOCK_D], dtype=COMPUTE)
    hidden_query_key = tl.zeros([BLOCK_T, BLOCK_T], dtype=COMPUTE)
    for start in range(0, hidden_dim, BLOCK_H):
        w1_offsets, w1_mask, b1_offsets, unit_valid, w2_offsets, w2_mask = _hidden_tile(
            state, start, head_dim, hidden_dim, BLOCK_D, BLOCK_H
        )
        w1 = tl.load(src_w1 + w1_offsets, mask=w1_mask, other=0.0)
        b1 = tl.load(src_b1 + b1_offsets, mask=unit_valid, other=0.0)
        w2 = tl.load(src_w2 + w2_offsets, mask=w2_mask, other=0.0)
        # zero without being read after the first mini-batch of a call
        sw1 = tl.load(src_sw1 + w1_offsets, mask=w1_mask & HAS_SUMS, other=0.0)
        sb1 = tl.load(src_sb1 + b1_offsets, mask=unit_valid & HAS_SUMS, other=0.0)
        sw2 = tl.load(src_sw2 + w2_offsets, mask=w2_mask & HAS_SUMS, other=0.0)

        hidden_key, gelu_grad = _gelu_tanh(tl.dot(k, w1, input_precision=PRECISION) + b1[None, :])
        grad1 = tl.dot(grad2, tl.trans(w2), input_precision=PRECISION) * gelu_grad
        z1_query = _dual_form_partial(q, w1, sw1, tau_rows, HAS_SUMS, PRECISION)
        z1_query = _dual_form_finish(z1_query, query_key, grad1, b1, sb1, tau_rows, eta, HAS_SUMS, PRECISION)
        hidden_query, _ = _gelu_tanh(z1_query)
        z_query += _dual_form_partial(hidden_query, w2, sw2, tau_rows, HAS_SUMS, PRECISION)
        hidden_query_key += tl.dot(hidden_query, tl.trans(hidden_key), input_precision=PRECISION)

        grad1_lr = grad1 * lr[:, None]
        sw1 += tl.dot(tl.trans(k), grad1_lr, input_precision=PRECISION)
        sb1 += tl.sum(grad1_lr, axis=0)
        sw2 += tl.dot(tl.trans(hidden_key), grad2_lr, input_precision=PRECISION)
        _write_update(
            dst_w1, dst_sw1, ckpt_w1, w1_offsets, w1_mask, w_slot_stride, w1, sw1, tau_last,
            complete, incomplete, minibatch, checkpoint_every, STORE_CHECKPOINTS,
        )  # fmt: skip
        _write_update(
            dst_b1, dst_sb1, ckpt_b1, b1_offsets, unit_valid, b1_slot_stride, b1, sb1, tau_last,
            complete, incomplete, minibatch, checkpoint_every, STORE_CHECKPOINTS,
        )  # fmt: skip
        _write_update(
            dst_w2, dst_sw2, ckpt_w2, w2_offsets, w2_mask, w_slot_stride, w2, sw2, tau_last,
            complete, incomplete, minibatch, checkpoint_every, STORE_CHECKPOINTS,
        )  # fmt: skip

    sb2 = tl.load(src_sb2 + b2_offsets, mask=col_valid & HAS_SUMS, other=0.0)
    z_query = _dual_form_finish(z_query, hidden_query_key, grad2, b2, sb2, tau_rows, eta, HAS_SUMS, PRECISION)
    _store_output(o_ptr, tile, mask, q, z_query, ln_weight, ln_bias, col_valid, head_dim, eps)
    _write_update(
        dst_b2, dst_sb2, ckpt_b2, b2_offsets, col_valid, b2_slot_stride, b2, sb2 + tl.sum(grad2_lr, axis=0),
        tau_last, complete, incomplete, minibatch, checkpoint_every, STORE_CHECKPOINTS,
    )  # fmt: skip
    # the next mini-batch reads what other threads of this program just wrote
    tl.debug_barrier()


@triton.jit
def ttt_mlp_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lr_ptr,
    o_ptr,
    tau_ptr,
    ln_weight_ptr,
    ln_bias_ptr,
    seq_start_ptr,
    seq_len_ptr,
    position_ptr,
    w1_in,
    b1_in,
    w2_in,
    b2_in,
    sw1_in,
    sb1_in,
    sw2_in,
    sb2_in,
    w1_out,
    b1_out,
    w2_out,
    b2_out,
    sw1_out,
    sb1_out,
    sw2_out,
    sb2_out,
    w1_ckpt,
    b1_ckpt,
    w2_ckpt,
    b2_ckpt,
    num_heads,
    head_dim,
    hidden_dim,
    mini_batch_size,
    checkpoint_every,
    eps,
    STORE_CHECKPOINTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    (
        seq,
        head,
        seq_start,
        seq_len,
        position,
        num_minibatches,
        _cols,
        _col_valid,
        ln_weight,
        ln_bias,
        tau_rows,
        tau_last,
    ) = _program_setup(
        seq_start_ptr,
        seq_len_ptr,
        position_ptr,
        ln_weight_ptr,
        ln_bias_ptr,
        tau_ptr,
        head_dim,
        mini_batch_size,
        BLOCK_T,
        BLOCK_D,
        COMPUTE,
    )

    state = (seq * num_heads + head).to(tl.int64)
    b2_slot_stride = tl.num_programs(0).to(tl.int64) * num_heads * head_dim
    b1_slot_stride = b2_slot_stride * (hidden_dim // head_dim)
    w_slot_stride = b1_slot_stride * head_dim

    # the first mini-batch moves the state from the input to the output buffers; it runs even for
    # an empty sequence, where it changes nothing
    _mlp_minibatch(
        q_ptr, k_ptr, v_ptr, lr_ptr, o_ptr,
        w1_in, b1_in, w2_in, b2_in, sw1_in, sb1_in, sw2_in, sb2_in,
        w1_out, b1_out, w2_out, b2_out, sw1_out, sb1_out, sw2_out, sb2_out,
        w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt, ln_weight, ln_bias, tau_rows, tau_last,
        seq_start, seq_len, position, 0, state, head, num_heads, head_dim, hidden_dim,
        mini_batch_size, w_slot_stride, b1_slot_stride, b2_slot_stride, checkpoint_every, eps,
        True, STORE_CHECKPOINTS, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE, PRECISION,
    )  # fmt: skip
    for minibatch in range(1, num_minibatches):
        _mlp_minibatch(
            q_ptr, k_ptr, v_ptr, lr_ptr, o_ptr,
            w1_out, b1_out, w2_out, b2_out, sw1_out, sb1_out, sw2_out, sb2_out,
            w1_out, b1_out, w2_out, b2_out, sw1_out, sb1_out, sw2_out, sb2_out,
            w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt, ln_weight, ln_bias, tau_rows, tau_last,
            seq_start, seq_len, position, minibatch, state, head, num_heads, head_dim, hidden_dim,
            mini_batch_size, w_slot_stride, b1_slot_stride, b2_slot_stride, checkpoint_every, eps,
            False, STORE_CHECKPOINTS, BLOCK_T, BLOCK_D, BLOCK_H, COMPUTE, PRECISION,
        )  # fmt: skip


def _tuned(kernel, configs: list[triton.Config]):
    """The kernel autotuned over configs on a GPU, or the kernel and its first config's meta-parameters
    in the interpreter (autotuning needs a GPU). Every run of a kernel recomputes its outputs from
    inputs it never writes, so autotuning's repeated runs are harmless."""
    if INTERPRET:
        return kernel, dict(configs[0].kwargs)
    return triton.autotune(configs, key=["head_dim", "mini_batch_size"])(kernel), {}


_LINEAR_KERNEL, _LINEAR_META = _tuned(ttt_linear_forward_kernel, _LINEAR_CONFIGS)
_MLP_KERNEL, _MLP_META = _tuned(ttt_mlp_forward_kernel, _MLP_CONFIGS)


# Launch ---------------------------------------------------------------------------------------------


def launch_forward(
    inner: InnerModel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    seq_start: torch.Tensor,
    seq_len: torch.Tensor,
    position: torch.Tensor,
    state: list[torch.Tensor],
    num_checkpoints: int,
    checkpoint_every: int,
    eps: float,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run the forward kernel over N sequences.

    q, k, v [B, T, H, d] and lr [B, T, H] (contiguous, any float dtype); tau [b] the token scale;
    ln_weight, ln_bias [H, d]; seq_start, seq_len, position [N] int64: sequence n is flattened tokens
    seq_start[n] .. + seq_len[n], starting at ``position[n]`` in its mini-batch; state: the state's
    floating tensors (W1, b1, [W2, b2,] S_W1, S_b1, [S_W2, S_b2]) [N, H, ...], contiguous, in the
    compute dtype (float32 or float64). Returns the outputs (dtype of q), the final state's floating
    tensors, and, when num_checkpoints > 0, the weights (W1, b1, [W2, b2]) [num_checkpoints, N, H, ...]
    at the start of mini-batches checkpoint_every, 2 checkpoint_every, ... of each sequence.
    """
    H, d = q.shape[2:]
    N = seq_start.shape[0]
    b = tau.shape[0]
    compute = state[0].dtype
    num_weights = len(state) // 2
    o = torch.empty_like(q)
    weights, sums = state[:num_weights], state[num_weights:]
    # the MLP kernel writes the output accumulators only where they end non-zero
    final = [torch.empty_like(t) for t in weights] + [torch.zeros_like(t) for t in sums]
    store_checkpoints = num_checkpoints > 0
    checkpoints = (
        [t.new_empty(num_checkpoints, *t.shape) for t in weights]
        if store_checkpoints
        else final[:num_weights]  # placeholders, never written
    )
    common = {
        "eps": eps,
        "checkpoint_every": checkpoint_every,
        "STORE_CHECKPOINTS": store_checkpoints,
        "BLOCK_T": max(16, triton.next_power_of_2(b)),
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "COMPUTE": _TORCH_TO_TRITON[compute],
        "PRECISION": _DOT_PRECISION[q.dtype],
    }
    tokens = (q, k, v, lr, o, tau, ln_weight, ln_bias, seq_start, seq_len, position)
    if inner.num_layers == 1:
        _LINEAR_KERNEL[(N, H)](*tokens, *state, *final, *checkpoints, H, d, b, **common, **_LINEAR_META)
    else:
        _MLP_KERNEL[(N, H)](
            *tokens, *state, *final, *checkpoints, H, d, inner.layer_shapes(d)[0][1], b, **common, **_MLP_META
        )
    return o, final, checkpoints if store_checkpoints else []
