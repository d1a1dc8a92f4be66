"""The Triton forward kernel of TTT-MLP, one program per (sequence, head) (see ``triton_helpers`` for
the mini-batch recurrence it runs).

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
    program_setup,
    step_sizes,
    store_checkpoint,
    store_output,
    tuned,
)

# wider hidden tiles spill registers at d = 64 (and take long to compile)
MLP_CONFIGS = [triton.Config({"BLOCK_H": h}, num_warps=w) for h in (32, 16) for w in (4, 8)]


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
    weight, _ = apply_update(weight, sums_end, tau_last, complete)
    tl.store(weight_ptr + offsets, weight, mask=mask)
    tl.store(sums_ptr + offsets, sums_end, mask=mask_if(mask, incomplete))
    if STORE_CHECKPOINTS:
        store_checkpoint(ckpt_ptr, offsets, mask, slot_stride, weight, minibatch, complete, checkpoint_every)


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
    q, k, v, lr, real, tile, mask = load_minibatch(
        q_ptr, k_ptr, v_ptr, lr_ptr, seq_start, seq_len, position, minibatch, head,
        num_heads, head_dim, mini_batch_size, BLOCK_T, BLOCK_D, COMPUTE,
    )  # fmt: skip
    cols = tl.arange(0, BLOCK_D)
    col_valid = cols < head_dim
    b2_offsets = state * head_dim + cols
    eta = step_sizes(tau_rows, lr, BLOCK_T)
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
        hidden_key, _ = gelu_tanh(tl.dot(k, w1, input_precision=PRECISION) + b1[None, :])
        z_key += tl.dot(hidden_key, w2, input_precision=PRECISION)
    b2 = tl.load(src_b2 + b2_offsets, mask=col_valid, other=0.0)
    grad2 = ln_fused_l2_grad(z_key + b2[None, :], v - k, ln_weight, ln_bias, real, col_valid, head_dim, eps)
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

        hidden_key, gelu_grad = gelu_tanh(tl.dot(k, w1, input_precision=PRECISION) + b1[None, :])
        grad1 = tl.dot(grad2, tl.trans(w2), input_precision=PRECISION) * gelu_grad
        z1_query = dual_form_partial(q, w1, sw1, tau_rows, HAS_SUMS, PRECISION)
        z1_query = dual_form_finish(z1_query, query_key, grad1, b1, sb1, tau_rows, eta, HAS_SUMS, PRECISION)
        hidden_query, _ = gelu_tanh(z1_query)
        z_query += dual_form_partial(hidden_query, w2, sw2, tau_rows, HAS_SUMS, PRECISION)
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
    z_query = dual_form_finish(z_query, hidden_query_key, grad2, b2, sb2, tau_rows, eta, HAS_SUMS, PRECISION)
    store_output(o_ptr, tile, mask, q, z_query, ln_weight, ln_bias, col_valid, head_dim, eps)
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


MLP_KERNEL, MLP_META = tuned(ttt_mlp_forward_kernel, MLP_CONFIGS)
