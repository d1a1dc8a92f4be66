"""Pieces shared by the Triton kernels of the TTT forward pass (SPEC.md sections 4-6): TTT-Linear's
(``triton_linear``) and TTT-MLP's (``triton_mlp``), one program per (sequence, head).

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

Optionally (``STORE_CHECKPOINTS``) the weights at the start of every ``checkpoint_every``-th
mini-batch are stored for the backward pass (``ttt_mixer.ops.ttt.triton``); at such a boundary the
accumulators are zero and the position is 0, so the weights are the whole state.

Block sizes: ``tl.dot`` needs every dim >= 16 on a GPU, so BLOCK_T = max(16, next_pow2(b)) and
BLOCK_D = max(16, next_pow2(d)), with masks; b and d need not be powers of two. Everything is
accumulated in ``COMPUTE`` (float32, or float64 for float64 inputs); inputs may be 16-bit. Matrix
products use 3xTF32 for float32 inputs, TF32 for 16-bit ones (see ``DOT_PRECISION``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Autotuning needs a GPU: in the interpreter every kernel runs its first config.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)

TORCH_TO_TRITON = {torch.float32: tl.float32, torch.float64: tl.float64}
# tl.dot on float32 state: 3xTF32 keeps float32 inputs near float32 accuracy on tensor cores (plain
# float32 FMA dots spill registers badly); 16-bit inputs round more than TF32 does; float64 is exact.
DOT_PRECISION = {
    torch.float64: "ieee",
    torch.float32: "tf32x3",
    torch.bfloat16: "tf32",
    torch.float16: "tf32",
}


# Shared pieces -------------------------------------------------------------------------------------


@triton.jit
def gelu_tanh(x):
    """gelu(x, approximate='tanh') and its derivative (reference_gelu_tanh_grad of naive.py)."""
    u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    # tanh(u) from exp(-2|u|), which cannot overflow
    decay = tl.exp(-2.0 * tl.abs(u))
    tanh = (1.0 - decay) / (1.0 + decay)
    tanh = tl.where(u < 0, -tanh, tanh)
    value = 0.5 * x * (1.0 + tanh)
    grad = 0.5 * (1.0 + tanh) + 0.5 * x * (1.0 - tanh * tanh) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return value, grad


@triton.jit
def load_minibatch(
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
def normalize(z, col_valid, head_dim, eps):
    """(z - mean) / std over the head_dim valid columns of every row, and 1 / std."""
    z = tl.where(col_valid[None, :], z, 0.0)
    mean = tl.sum(z, axis=1) / head_dim
    centered = tl.where(col_valid[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / head_dim + eps)
    return centered * rstd[:, None], rstd


@triton.jit
def ln_fused_l2_grad(z, target, ln_weight, ln_bias, real, col_valid, head_dim, eps):
    """d/dz of 1/2 ||LN(z) - target||^2 (reference_ln_fused_l2_grad of naive.py), zero outside the real
    tokens and columns so that padding never reaches the accumulators."""
    z_hat, rstd = normalize(z, col_valid, head_dim, eps)
    grad_hat = (ln_weight[None, :] * z_hat + ln_bias[None, :] - target) * ln_weight[None, :]
    grad = (
        head_dim * grad_hat
        - tl.sum(grad_hat, axis=1)[:, None]
        - z_hat * tl.sum(grad_hat * z_hat, axis=1)[:, None]
    ) * (rstd / head_dim)[:, None]
    return tl.where(real[:, None] & col_valid[None, :], grad, 0.0)


@triton.jit
def store_output(o_ptr, tile, mask, q, z, ln_weight, ln_bias, col_valid, head_dim, eps):
    """o = q + LN(z) for the real tokens, in the output's dtype."""
    z_hat, _ = normalize(z, col_valid, head_dim, eps)
    tl.store(o_ptr + tile, q + ln_weight[None, :] * z_hat + ln_bias[None, :], mask=mask)


@triton.jit
def step_sizes(tau_rows, lr, BLOCK_T: tl.constexpr):
    """eta[i, j] = tau_i lr_j for j <= i: the step applied to query i from key j (SPEC.md section 2)."""
    cells = tl.arange(0, BLOCK_T)
    return tl.where(cells[:, None] >= cells[None, :], tau_rows[:, None] * lr[None, :], 0.0)


@triton.jit
def dual_form_partial(x_query, weight, sums, tau_rows, HAS_SUMS: tl.constexpr, PRECISION: tl.constexpr):
    """x_i W - tau_i x_i S_W: the part of a layer's dual form that sums over the layer's inputs (the
    MLP's second layer accumulates it over hidden tiles)."""
    z = tl.dot(x_query, weight, input_precision=PRECISION)
    if HAS_SUMS:
        z -= tau_rows[:, None] * tl.dot(x_query, sums, input_precision=PRECISION)
    return z


@triton.jit
def dual_form_finish(
    z, query_key, grad, bias, sum_bias, tau_rows, eta, HAS_SUMS: tl.constexpr, PRECISION: tl.constexpr
):
    """Zbar_i = z_i + b - tau_i S_b - sum_{j<=i} eta_ij (x_i . k_j + 1) grad_j, from the partial z
    above and query_key[i, j] = x_i . k_j (the layer's query and key inputs)."""
    z += bias[None, :]
    if HAS_SUMS:
        z -= tau_rows[:, None] * sum_bias[None, :]
    return z - tl.dot((query_key + 1.0) * eta, grad, input_precision=PRECISION)


@triton.jit
def mask_if(mask, condition):
    """mask where the scalar condition holds, else all false (tl.where rather than &: the interpreter
    mis-types a scalar boolean broadcast by &)."""
    return tl.where(condition, mask, False)


@triton.jit
def apply_update(weight, sums_end, tau_last, complete):
    """End of a mini-batch: a complete one moves W to W - tau_b S and clears S; else W waits and S
    carries over."""
    return tl.where(complete, weight - tau_last * sums_end, weight), tl.where(complete, 0.0, sums_end)


@triton.jit
def store_checkpoint(ckpt_ptr, offsets, mask, slot_stride, weight, minibatch, complete, checkpoint_every):
    """After mini-batch m, keep the weights that start mini-batch m + 1 when m + 1 is a multiple of
    checkpoint_every, in slot (m + 1) / checkpoint_every - 1."""
    next_minibatch = minibatch + 1
    # slot_stride is int64; the slot may be a compile-time constant (Triton specializes ints equal to 1)
    slot = next_minibatch // checkpoint_every - 1
    due = complete & (next_minibatch % checkpoint_every == 0)
    tl.store(ckpt_ptr + slot * slot_stride + offsets, weight, mask=mask_if(mask, due))


@triton.jit
def program_setup(
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


def tuned(kernel, configs: list[triton.Config]):
    """The kernel autotuned over configs on a GPU, or the kernel and its first config's meta-parameters
    in the interpreter (autotuning needs a GPU). Every run of a kernel recomputes its outputs from
    inputs it never writes, so autotuning's repeated runs are harmless."""
    if INTERPRET:
        return kernel, dict(configs[0].kwargs)
    return triton.autotune(configs, key=["head_dim", "mini_batch_size"])(kernel), {}
