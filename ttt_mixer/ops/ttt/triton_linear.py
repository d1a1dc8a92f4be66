"""The Triton forward kernel of TTT-Linear, one program per (sequence, head): W, b, S_W, S_b stay in
registers across all mini-batches (see ``triton_helpers`` for the mini-batch recurrence it runs)."""

from __future__ import annotations

import triton
import triton.language as tl

from ttt_mixer.ops.ttt.triton_helpers import (
    apply_update,
    dual_form_finish,
    dual_form_partial,
    ln_fused_l2_grad,
    load_minibatch,
    program_setup,
    step_sizes,
    store_checkpoint,
    store_output,
    tuned,
)

LINEAR_CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8, 2)]


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
    q, k, v, lr, real, tile, mask = load_minibatch(
        q_ptr, k_ptr, v_ptr, lr_ptr, seq_start, seq_len, position, minibatch, head,
        num_heads, head_dim, mini_batch_size, BLOCK_T, BLOCK_D, COMPUTE,
    )  # fmt: skip
    col_valid = tl.arange(0, BLOCK_D) < head_dim
    eta = step_sizes(tau_rows, lr, BLOCK_T)
    z_key = tl.dot(k, weight, input_precision=PRECISION) + bias[None, :]
    grad = ln_fused_l2_grad(z_key, v - k, ln_weight, ln_bias, real, col_valid, head_dim, eps)
    z_query = dual_form_partial(q, weight, sum_w, tau_rows, HAS_SUMS, PRECISION)
    query_key = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    z_query = dual_form_finish(z_query, query_key, grad, bias, sum_b, tau_rows, eta, HAS_SUMS, PRECISION)
    store_output(o_ptr, tile, mask, q, z_query, ln_weight, ln_bias, col_valid, head_dim, eps)

    grad_lr = grad * lr[:, None]
    sum_w_end = tl.dot(tl.trans(k), grad_lr, input_precision=PRECISION)
    sum_b_end = tl.sum(grad_lr, axis=0)
    if HAS_SUMS:
        sum_w_end += sum_w
        sum_b_end += sum_b
    complete = (minibatch + 1) * mini_batch_size - position <= seq_len
    weight, sum_w = apply_update(weight, sum_w_end, tau_last, complete)
    bias, sum_b = apply_update(bias, sum_b_end, tau_last, complete)
    if STORE_CHECKPOINTS:
        store_checkpoint(
            w_ckpt_ptr, w_offsets, w_mask, w_slot_stride, weight, minibatch, complete, checkpoint_every
        )
        store_checkpoint(
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
    ) = program_setup(
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


LINEAR_KERNEL, LINEAR_META = tuned(ttt_linear_forward_kernel, LINEAR_CONFIGS)
