"""Pieces shared by the Triton kernels of TTT (docs/math.md sections 4-7 and 14): the forward kernel
(``triton_forward``, running TTT-Linear's recurrence of ``triton_linear`` or TTT-MLP's of
``triton_mlp``) and the backward kernels (``triton_linear_backward``, ``triton_mlp_backward``), one
program per (sequence, head), and the argument groups they take (``Tokens``, ``Shared``, ``Sequences``,
``StateBuffers``, ``Dims``).

A program walks its sequence's mini-batches in order. Mini-batches are aligned to the sequence's own
first token and continue from its state's position p (mini-batch m covers token offsets
[m b - p, (m + 1) b - p)); cells outside the sequence read zero inputs and a zero learning rate, so
they change nothing. Per mini-batch (K, V, Q [b, d], lr [b], tau [b], eta_ij = tau_i lr_j, j <= i):

    g = dl/dZ at W for every key (LayerNorm backward fused with the L2 loss, target V - K)
    Zbar_i = Q_i W + b - tau_i (Q_i S_W + S_b) - sum_{j<=i} eta_ij (Q_i . K_j + 1) g_j,  o = Q + LN(Zbar)
    S_end = S + sum_j lr_j [K_j; 1]^T g_j;  complete mini-batch: W <- W - tau_b S_end, S <- 0

TTT-MLP applies the same dual form to both layers; the hidden layer's gradient flows back through W2
and gelu'. Only the first mini-batch of a call can start with non-zero accumulators S (a state read
in the middle of a mini-batch): every later one starts after a complete mini-batch, so the kernels
read and apply the accumulators only in the first (``MiniBatch.first``), inside the same loop.

Optionally (``STORE_CHECKPOINTS``) the weights at the start of every ``checkpoint_every``-th
mini-batch are stored for the backward kernels (``triton_backward``); at such a boundary the
accumulators are zero and the position is 0, so the weights are the whole state.

Block sizes: ``tl.dot`` needs every dim >= 16 on a GPU, so BLOCK_T = max(16, next_pow2(b)) and
BLOCK_D = max(16, next_pow2(d)), with masks; b and d need not be powers of two. Everything is
accumulated in ``COMPUTE`` (float32, or float64 for float64 inputs); inputs may be 16-bit. Matrix
products use 3xTF32 for float32 inputs, TF32 for 16-bit ones (see ``DOT_PRECISION``).
"""

from __future__ import annotations

import os
from typing import NamedTuple

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


# Kernel arguments -----------------------------------------------------------------------------------
#
# The forward kernel (``triton_forward``) takes (tokens, o, shared, sequences, buffers, dims) and its
# meta-parameters; the backward kernels (``triton_backward``) the same groups and their own.


class Tokens(NamedTuple):
    """The per-token inputs, contiguous [B, T, H, d] (lr [B, T, H])."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lr: torch.Tensor


class Shared(NamedTuple):
    """What every program reads: the token scale tau [b] and the inner LayerNorm [H, d] with its eps."""

    tau: torch.Tensor
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    eps: float


class Sequences(NamedTuple):
    """[N] int64 each: sequence n is flattened tokens start[n] .. start[n] + length[n] - 1, and its state
    has read position[n] tokens of its current mini-batch."""

    start: torch.Tensor
    length: torch.Tensor
    position: torch.Tensor


class Dims(NamedTuple):
    """The sizes: head dim d, the width of the first inner layer's output (4d for TTT-MLP, d for
    TTT-Linear), the mini-batch size b, and the mini-batches between two checkpoints of the weights."""

    head_dim: int
    hidden_dim: int
    mini_batch_size: int
    checkpoint_every: int


class StateBuffers(NamedTuple):
    """Where the forward reads and writes the state: tuples of pointers in the state tuple's order,
    initial (read) and final (written) (W_1, b_1, [W_2, b_2,] S_W_1, S_b_1, [S_W_2, S_b_2]) [N, H, ...],
    and checkpoints (W_1, b_1, [W_2, b_2]) [num_checkpoints, N, H, ...], written when stored."""

    initial: tuple
    final: tuple
    checkpoints: tuple


# What a program reads and derives ----------------------------------------------------------------------


class Program(NamedTuple):
    """What a (sequence, head) program reads once, at its start."""

    head: tl.tensor
    state_row: tl.tensor  # int64 index of (sequence, head) in the [N, H, ...] state tensors
    start: tl.tensor  # the sequence's first flattened token
    length: tl.tensor  # its number of tokens
    position: tl.tensor  # tokens its state has read of its first mini-batch
    num_minibatches: tl.tensor  # mini-batches its tokens touch, at least 1
    ln_weight: tl.tensor  # [BLOCK_D] the head's inner LayerNorm
    ln_bias: tl.tensor  # [BLOCK_D]
    eps: tl.tensor  # the inner LayerNorm's
    tau_rows: tl.tensor  # [BLOCK_T] the token scale tau_i
    tau_last: tl.tensor  # tau_b


class MiniBatch(NamedTuple):
    """One mini-batch of a program's sequence, as loaded."""

    index: tl.tensor
    first: tl.tensor  # the first of the call: the only one that can start with accumulated gradients
    complete: tl.tensor  # its last cell holds a real token: it ends by updating the weights
    q: tl.tensor  # [BLOCK_T, BLOCK_D], zero outside the sequence
    k: tl.tensor
    v: tl.tensor
    lr: tl.tensor  # [BLOCK_T], zero outside the sequence
    eta: tl.tensor  # [BLOCK_T, BLOCK_T] the step sizes eta_ij
    real: tl.tensor  # [BLOCK_T] the cells that hold real tokens
    tile: tl.tensor  # [BLOCK_T, BLOCK_D] offsets of its queries (and outputs) in the [B, T, H, d] layout
    mask: tl.tensor  # [BLOCK_T, BLOCK_D] real tokens and valid columns
    rows: tl.tensor  # [BLOCK_T] offsets of its learning rates in the [B, T, H] layout


class Tile(NamedTuple):
    """Where a block of one program's part of an [N, H, ...] state tensor lies."""

    offsets: tl.tensor
    mask: tl.tensor
    slot_stride: tl.tensor  # int64 elements between checkpoint slots (N H times the part's size)


@triton.jit
def program_setup(
    shared, sequences, dims, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr
):
    """What every forward program reads first: its sequence and head, the sequence's bounds and
    start position, its mini-batch count, the head's inner LayerNorm and the token scales."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    position = tl.load(sequences.position + seq)
    length = tl.load(sequences.length + seq)
    b = dims.mini_batch_size
    cols = tl.arange(0, BLOCK_D)
    col_valid = cols < dims.head_dim
    cells = tl.arange(0, BLOCK_T)
    return Program(
        head=head,
        state_row=(seq * tl.num_programs(1) + head).to(tl.int64),
        start=tl.load(sequences.start + seq),
        length=length,
        position=position,
        # an empty sequence still runs one: its cells are all empty, so it changes nothing (TTT-MLP's
        # moves the state to the output buffers)
        num_minibatches=tl.maximum((position + length + b - 1) // b, 1),
        ln_weight=tl.load(shared.ln_weight + head * dims.head_dim + cols, mask=col_valid, other=0.0).to(
            COMPUTE
        ),
        ln_bias=tl.load(shared.ln_bias + head * dims.head_dim + cols, mask=col_valid, other=0.0).to(COMPUTE),
        eps=shared.eps,
        tau_rows=tl.load(shared.tau + cells, mask=cells < b, other=0.0).to(COMPUTE),
        tau_last=tl.load(shared.tau + b - 1).to(COMPUTE),
    )


@triton.jit
def load_minibatch(
    tokens, program, index, dims, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr
):
    """Mini-batch ``index`` of the program's sequence and head (see ``MiniBatch``)."""
    num_heads = tl.num_programs(1)
    cells = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    offset = index * dims.mini_batch_size + cells - program.position
    real = (cells < dims.mini_batch_size) & (offset >= 0) & (offset < program.length)
    token = program.start + offset
    tile = (token * num_heads + program.head)[:, None] * dims.head_dim + cols[None, :]
    mask = real[:, None] & (cols < dims.head_dim)[None, :]
    rows = token * num_heads + program.head
    lr = tl.load(tokens.lr + rows, mask=real, other=0.0).to(COMPUTE)
    return MiniBatch(
        index=index,
        first=index == 0,
        complete=(index + 1) * dims.mini_batch_size - program.position <= program.length,
        q=tl.load(tokens.q + tile, mask=mask, other=0.0).to(COMPUTE),
        k=tl.load(tokens.k + tile, mask=mask, other=0.0).to(COMPUTE),
        v=tl.load(tokens.v + tile, mask=mask, other=0.0).to(COMPUTE),
        lr=lr,
        eta=step_sizes(program.tau_rows, lr, BLOCK_T),
        real=real,
        tile=tile,
        mask=mask,
        rows=rows,
    )


@triton.jit
def slot_stride(part_size):
    """Elements between two checkpoint slots of an [N, H, ...] tensor whose (sequence, head) parts
    hold part_size elements each (int64)."""
    return tl.num_programs(0).to(tl.int64) * tl.num_programs(1) * part_size


@triton.jit
def matrix_tile(state_row, rows, cols, num_rows, num_cols):
    """Rows x cols of the program's [num_rows, num_cols] part of an [N, H, num_rows, num_cols] tensor."""
    return Tile(
        offsets=state_row * num_rows * num_cols + rows[:, None] * num_cols + cols[None, :],
        mask=(rows < num_rows)[:, None] & (cols < num_cols)[None, :],
        slot_stride=slot_stride(num_rows * num_cols),
    )


@triton.jit
def vector_tile(state_row, cols, num_cols):
    """Entries cols of the program's [num_cols] part of an [N, H, num_cols] tensor."""
    return Tile(offsets=state_row * num_cols + cols, mask=cols < num_cols, slot_stride=slot_stride(num_cols))


# The mini-batch recurrence ---------------------------------------------------------------------------------


@triton.jit
def _gelu_tanh_inner(x):
    """tanh(u) at u = sqrt(2/pi) (x + 0.044715 x^3), the tanh that gelu_tanh and its derivatives share."""
    u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    # tanh(u) from exp(-2|u|), which cannot overflow
    decay = tl.exp(-2.0 * tl.abs(u))
    tanh = (1.0 - decay) / (1.0 + decay)
    return tl.where(u < 0, -tanh, tanh)


@triton.jit
def gelu_tanh(x):
    """gelu(x, approximate='tanh') and its derivative (reference_gelu_tanh_grad of reference.py)."""
    tanh = _gelu_tanh_inner(x)
    value = 0.5 * x * (1.0 + tanh)
    grad = 0.5 * (1.0 + tanh) + 0.5 * x * (1.0 - tanh * tanh) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return value, grad


@triton.jit
def gelu_tanh_second(x):
    """The second derivative of gelu(x, approximate='tanh') (GeluTanhWithGrad's backward in inner.py):
    with t = tanh(u), (1 - t^2) (u' + x/2 (u'' - 2 t u'^2))."""
    tanh = _gelu_tanh_inner(x)
    u_grad = SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    u_second = SQRT_2_OVER_PI * 6 * 0.044715 * x
    return (1.0 - tanh * tanh) * (u_grad + 0.5 * x * (u_second - 2.0 * tanh * u_grad * u_grad))


@triton.jit
def normalize(z, col_valid, head_dim, eps):
    """(z - mean) / std over the head_dim valid columns of every row, and 1 / std."""
    z = tl.where(col_valid[None, :], z, 0.0)
    mean = tl.sum(z, axis=1) / head_dim
    centered = tl.where(col_valid[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / head_dim + eps)
    return centered * rstd[:, None], rstd


@triton.jit
def normalize_backward(grad, z_hat, rstd, col_valid, head_dim):
    """rstd (grad - mean(grad) - z_hat mean(grad z_hat)) per row: the gradient w.r.t. z of a loss whose
    gradient w.r.t. z_hat = normalize(z) is grad (the Jacobian of normalize is symmetric, so this is
    also its forward product), zero outside the valid columns."""
    grad = tl.where(col_valid[None, :], grad, 0.0)
    mean_grad = tl.sum(grad, axis=1) / head_dim
    mean_grad_z_hat = tl.sum(grad * z_hat, axis=1) / head_dim
    value = (grad - mean_grad[:, None] - z_hat * mean_grad_z_hat[:, None]) * rstd[:, None]
    return tl.where(col_valid[None, :], value, 0.0)


@triton.jit
def ln_fused_l2_parts(z, target, program, dims, BLOCK_D: tl.constexpr):
    """The pieces of the LayerNorm-L2 gradient (docs/math.md section 1): normalize(z) = zh, 1 / std = r
    and the error e = ln_weight zh + ln_bias - target."""
    col_valid = tl.arange(0, BLOCK_D) < dims.head_dim
    z_hat, rstd = normalize(z, col_valid, dims.head_dim, program.eps)
    error = program.ln_weight[None, :] * z_hat + program.ln_bias[None, :] - target
    return z_hat, rstd, error


@triton.jit
def ln_fused_l2_grad_and_parts(z, target, program, minibatch, dims, BLOCK_D: tl.constexpr):
    """``ln_fused_l2_grad`` and the parts of ``ln_fused_l2_parts`` it is computed from (the backward
    kernels need both)."""
    col_valid = tl.arange(0, BLOCK_D) < dims.head_dim
    z_hat, rstd, error = ln_fused_l2_parts(z, target, program, dims, BLOCK_D)
    grad = normalize_backward(error * program.ln_weight[None, :], z_hat, rstd, col_valid, dims.head_dim)
    return tl.where(minibatch.real[:, None], grad, 0.0), z_hat, rstd, error


@triton.jit
def ln_fused_l2_grad(z, target, program, minibatch, dims, BLOCK_D: tl.constexpr):
    """d/dz of 1/2 ||LN(z) - target||^2 (reference_ln_fused_l2_grad of reference.py) with the head's
    LayerNorm, zero outside the real tokens and columns so that padding never reaches the
    accumulators."""
    grad, _, _, _ = ln_fused_l2_grad_and_parts(z, target, program, minibatch, dims, BLOCK_D)
    return grad


@triton.jit
def ln_fused_l2_grad_backward(grad_of_grad, grad, z_hat, rstd, error, program, dims, BLOCK_D: tl.constexpr):
    """Back-propagates grad_of_grad, the outer gradient w.r.t. grad = ``ln_fused_l2_grad(z, target)``
    (zero on empty cells), from the parts of ``ln_fused_l2_parts``: returns the outer gradients w.r.t.
    z and target [BLOCK_T, BLOCK_D], and w.r.t. ln_weight and ln_bias summed over the rows [BLOCK_D]
    (derivation: docs/math.md section 14)."""
    col_valid = tl.arange(0, BLOCK_D) < dims.head_dim
    head_dim = dims.head_dim
    ln_weight = program.ln_weight[None, :]
    grad_hat = ln_weight * error
    d_grad_hat = normalize_backward(grad_of_grad, z_hat, rstd, col_valid, head_dim)
    mean_grad_hat_z_hat = tl.sum(grad_hat * z_hat, axis=1) / head_dim
    mean_outer_z_hat = tl.sum(grad_of_grad * z_hat, axis=1) / head_dim
    d_z_hat = ln_weight * ln_weight * d_grad_hat - rstd[:, None] * (
        grad_of_grad * mean_grad_hat_z_hat[:, None] + grad_hat * mean_outer_z_hat[:, None]
    )
    # the standard deviation's own share: 1 / std scales grad as a whole
    mean_outer_grad = tl.sum(grad_of_grad * grad, axis=1) / head_dim
    d_z = (
        normalize_backward(d_z_hat, z_hat, rstd, col_valid, head_dim)
        - (rstd * mean_outer_grad)[:, None] * z_hat
    )
    d_ln_weight = tl.sum(d_grad_hat * (error + ln_weight * z_hat), axis=0)
    d_ln_bias = tl.sum(d_grad_hat * ln_weight, axis=0)
    return d_z, -d_grad_hat * ln_weight, d_ln_weight, d_ln_bias


@triton.jit
def store_output(o_ptr, minibatch, z, program, dims, BLOCK_D: tl.constexpr):
    """o = q + LN(z) for the real tokens, in the output's dtype."""
    col_valid = tl.arange(0, BLOCK_D) < dims.head_dim
    z_hat, _ = normalize(z, col_valid, dims.head_dim, program.eps)
    o = minibatch.q + program.ln_weight[None, :] * z_hat + program.ln_bias[None, :]
    tl.store(o_ptr + minibatch.tile, o, mask=minibatch.mask)


@triton.jit
def causal(BLOCK_T: tl.constexpr):
    """[BLOCK_T, BLOCK_T]: key j is visible to query i (j <= i)."""
    cells = tl.arange(0, BLOCK_T)
    return cells[:, None] >= cells[None, :]


@triton.jit
def step_sizes(tau_rows, lr, BLOCK_T: tl.constexpr):
    """eta[i, j] = tau_i lr_j for j <= i: the step applied to query i from key j (docs/math.md section 2)."""
    return tl.where(causal(BLOCK_T), tau_rows[:, None] * lr[None, :], 0.0)


@triton.jit
def dual_form_partial(x_query, weight, sums, program, minibatch, PRECISION: tl.constexpr):
    """x_i W - tau_i x_i S_W: the part of a layer's dual form that sums over the layer's inputs (the
    MLP's second layer accumulates it over hidden tiles); S_W only in the first mini-batch."""
    z = tl.dot(x_query, weight, input_precision=PRECISION)
    if minibatch.first:
        z -= program.tau_rows[:, None] * tl.dot(x_query, sums, input_precision=PRECISION)
    return z


@triton.jit
def dual_form_finish(z, query_key, grad, bias, sum_bias, program, minibatch, PRECISION: tl.constexpr):
    """Zbar_i = z_i + b - tau_i S_b - sum_{j<=i} eta_ij (x_i . k_j + 1) grad_j, from the partial z
    above and query_key[i, j] = x_i . k_j (the layer's query and key inputs); S_b only in the first
    mini-batch."""
    z += bias[None, :]
    if minibatch.first:
        z -= program.tau_rows[:, None] * sum_bias[None, :]
    return z - tl.dot((query_key + 1.0) * minibatch.eta, grad, input_precision=PRECISION)


@triton.jit
def mask_if(mask, condition):
    """mask where the scalar condition holds, else all false (tl.where rather than &: the interpreter
    mis-types a scalar boolean broadcast by &)."""
    return tl.where(condition, mask, False)


@triton.jit
def mask_unless(mask, condition):
    """mask where the scalar condition does not hold, else all false (see ``mask_if``)."""
    return tl.where(condition, False, mask)


@triton.jit
def apply_update(weight, sums_end, program, minibatch):
    """End of a mini-batch: a complete one moves W to W - tau_b S and clears S; else W waits and S
    carries over."""
    complete = minibatch.complete
    return tl.where(complete, weight - program.tau_last * sums_end, weight), tl.where(complete, 0.0, sums_end)


@triton.jit
def store_checkpoint(ckpt_ptr, tile, weight, program, minibatch, checkpoint_every):
    """After mini-batch m, keep the weights that start mini-batch m + 1 when m + 1 is a multiple of
    checkpoint_every and the sequence has a mini-batch m + 1, in slot (m + 1) / checkpoint_every - 1
    (after a sequence's last mini-batch that slot may lie past the buffer's end)."""
    next_minibatch = minibatch.index + 1
    # slot_stride is int64; the slot may be a compile-time constant (Triton specializes ints equal to 1)
    slot = next_minibatch // checkpoint_every - 1
    due = (next_minibatch % checkpoint_every == 0) & (next_minibatch < program.num_minibatches)
    tl.store(ckpt_ptr + slot * tile.slot_stride + tile.offsets, weight, mask=mask_if(tile.mask, due))


def tuned(kernel, configs: list[triton.Config], interpreter_meta: dict | None = None):
    """The kernel autotuned over configs on a GPU, or the kernel and, in the interpreter (autotuning
    needs a GPU), interpreter_meta or else its first config's meta-parameters. Every run of a kernel
    recomputes its outputs from inputs it never writes, so autotuning's repeated runs are harmless.
    The tuning key: the sizes, and the dtypes through COMPUTE and PRECISION (argument groups carry no
    dtype for the autotuner)."""
    if INTERPRET:
        return kernel, dict(configs[0].kwargs if interpreter_meta is None else interpreter_meta)
    return triton.autotune(configs, key=["dims", "COMPUTE", "PRECISION"])(kernel), {}
