"""Chunked dual form of TTT in PyTorch (docs/math.md section 4): the path used where Triton is not.

Only the weight recurrence runs mini-batch by mini-batch (one matmul per layer for the gradients and
one for the update); everything that does not feed the next mini-batch's weights (the attention-like
dual-form terms, the output LayerNorm) runs once over all mini-batches afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ttt_mixer.ops.ttt.checks import check_inputs
from ttt_mixer.ops.ttt.grid import MiniBatchGrid
from ttt_mixer.ops.ttt.inner import (
    get_inner_model,
    inner_gradients,
    inner_output,
    loss_offset,
    token_scale,
    with_ones,
)
from ttt_mixer.ops.ttt.state import augmented_params, join_state, split_state


def ttt_chunk(
    inner_model: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_offset: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    params: Sequence[torch.Tensor],
    initial_state: tuple[torch.Tensor, ...] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """TTT over whole sequences in the dual form.

    Args:
        inner_model: ``"linear"`` (TTT-Linear) or ``"mlp"`` (TTT-MLP).
        q, k, v: [B, T, H, d] queries, keys and values (after any RoPE or convolution).
        lr: [B, T, H] per-key learning rate lr_j (base lr * sigmoid(gate) / d, docs/math.md section 2).
        token_offset: [b] learnable offsets eps_i of the token scale; b is the mini-batch size.
        ln_weight, ln_bias: [H, d] the inner LayerNorm, or both None for f(z) = f_res(z) (no
            LayerNorm, no residual: the setting of docs/math.md section 11).
        params: the inner model's initial weights, ``(w1, b1)`` or ``(w1, b1, w2, b2)`` with
            w [H, d_in, d_out] and b [H, d_out]; used when ``initial_state`` is None.
        initial_state: a state tuple (see ``ttt_mixer.ops.ttt.state``) to continue from, possibly in the
            middle of a mini-batch, one per sequence.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: [N + 1] offsets of N packed sequences in a batch of size 1.
        eps: the inner LayerNorm epsilon.

    Returns:
        o: [B, T, H, d] the outputs XQ + LN(f_res(XQ; W_bar)) in the dtype of q, and the final state
        (float32, or float64 for float64 inputs) or None.
    """
    inner = get_inner_model(inner_model)
    params = list(params)
    num_sequences = check_inputs(
        inner, q, k, v, lr, token_offset, ln_weight, ln_bias, params, initial_state, cu_seqlens, eps
    )
    B, T = q.shape[:2]
    b = token_offset.shape[0]
    dtype = torch.promote_types(q.dtype, torch.float32)

    if initial_state is None:
        # not ``initial_state()``: without a state there are no accumulators at all (sums None), which
        # lets the loop skip their terms and fold tau_b into the learning rates
        position = None  # every sequence starts a fresh mini-batch
        weights = [w.to(dtype).expand(num_sequences, -1, -1, -1) for w in augmented_params(params)]
        sums = None
    else:
        position, weights, sums = split_state(initial_state)
        weights = [w.to(dtype) for w in weights]
        sums = [s.to(dtype) for s in sums]

    grid = MiniBatchGrid(B, T, cu_seqlens, position, b, device=q.device)
    N, H, M = num_sequences, q.shape[2], grid.num_minibatches

    qg, kg, vg = (grid.to_grid(t.to(dtype)) for t in (q, k, v))
    lrg = grid.to_grid(lr.to(dtype)).movedim(3, 1).flatten(0, 1)  # [N * H, M, b]
    tau = token_scale(token_offset.to(dtype))
    ln = (None, None) if ln_weight is None else (ln_weight.to(dtype), ln_bias.to(dtype))
    lnw = None if ln[0] is None else ln[0].repeat(N, 1)[:, None]  # [N * H, 1, d]

    # [N, M, b, H, e] -> [N * H, M, b, e]; the heads move first before the ones are appended so that
    # q and k are copied once
    q_aug, k_aug = (with_ones(t.movedim(3, 1)).flatten(0, 1) for t in (qg, kg))
    # eta[i, j] = tau_i * lr_j for j <= i inside each mini-batch; the first layer's dual-form scores
    # depend on the inputs alone, so they are computed for all mini-batches at once
    eta = (tau[:, None] * lrg[..., None, :]).tril()  # [N * H, M, b, b]
    scores = (q_aug @ k_aug.transpose(-1, -2)) * eta
    # unbound once, so that the backward pass does not zero-fill a full-size gradient for every
    # mini-batch's slice; [N * H, b, ...] each: 3-D for (b)addbmm
    q_mb, k_mb, scores_mb, eta_mb = (t.unbind(1) for t in (q_aug, k_aug, scores, eta))
    offset_mb = loss_offset(kg, vg, *ln).movedim(3, 1).flatten(0, 1).unbind(1)
    weights = [w.flatten(0, 1) for w in weights]
    sums = None if sums is None else [t.flatten(0, 1) for t in sums]
    complete = grid.complete.repeat_interleave(H, dim=0)[:, :, None, None]  # [N * H, M, 1, 1]
    # with whole mini-batches only, the end-of-mini-batch scale tau_b folds into the learning rates
    # and each update is one baddbmm; otherwise the unscaled sums are kept for the final state
    whole_minibatches = grid.all_complete and sums is None
    lr_mb = (lrg * tau[-1] if whole_minibatches else lrg)[..., None].unbind(1)  # [N * H, b, 1] each

    carried, outputs = sums, []
    for m in range(M):
        x_m, g_m = inner_gradients(inner, k_mb[m], offset_mb[m], weights, lnw, eps)
        x_query = q_mb[m]
        for layer in range(inner.num_layers):
            scores_m = scores_mb[m] if layer == 0 else (x_query @ x_m[layer].transpose(-1, -2)) * eta_mb[m]
            z = torch.baddbmm(x_query @ weights[layer], scores_m, g_m[layer], alpha=-1)
            if m == 0 and sums is not None:
                # the accumulators of a state read mid-mini-batch only reach its first mini-batch
                z = z - tau[:, None] * (x_query @ sums[layer])
            if layer + 1 < inner.num_layers:
                x_query = with_ones(F.gelu(z, approximate="tanh"))
        outputs.append(z)
        scaled_inputs = [(lr_mb[m] * x).transpose(-1, -2) for x in x_m]
        if whole_minibatches:
            weights = [
                torch.baddbmm(w, x, g, alpha=-1) for w, x, g in zip(weights, scaled_inputs, g_m, strict=True)
            ]
            continue
        step_sums = [x @ g for x, g in zip(scaled_inputs, g_m, strict=True)]
        if carried is not None:
            step_sums = [c + u for c, u in zip(carried, step_sums, strict=True)]
        updated = [w - tau[-1] * u for w, u in zip(weights, step_sums, strict=True)]
        done = complete[:, m]
        weights = [torch.where(done, u, w) for u, w in zip(updated, weights, strict=True)]
        carried = [torch.where(done, 0.0, u) for u in step_sums]

    z = torch.stack(outputs, dim=1).unflatten(0, (N, H)).movedim(1, 3)  # [N, M, b, H, d]
    o = grid.from_grid(inner_output(qg, z, *ln, eps), B, T).to(q.dtype)
    weights = [w.unflatten(0, (N, H)) for w in weights]
    carried = None if carried is None else [c.unflatten(0, (N, H)) for c in carried]

    if not output_final_state:
        return o, None
    final_sums = carried if carried is not None else [torch.zeros_like(w) for w in weights]
    return o, join_state(grid.final_position, weights, final_sums)
