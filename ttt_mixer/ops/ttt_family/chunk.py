"""The chunked form of a TTT-family op in PyTorch (docs/math.md section 13).

Only the weight recurrence runs mini-batch by mini-batch. In the dual order, how every token's read
weights depend on the mini-batch's start weights, carried update and momentum and on each token's
gradient is a set of coefficients that depend on the gates alone (``dual_coefficients``), so that a
mini-batch's outputs are the dual form of docs/math.md section 4 with those coefficients in place of
E. In the apply-then-update order a mini-batch's queries read its start weights, and its gradient sum
is folded in at its end (``finish_minibatch``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ttt_mixer.ops.ttt.grid import MiniBatchGrid
from ttt_mixer.ops.ttt.inner import inner_output
from ttt_mixer.ops.ttt_family.checks import check_family_inputs
from ttt_mixer.ops.ttt_family.inner import (
    column_norms,
    finish_minibatch,
    inner_apply,
    key_gradients,
    param_matrices,
    plain_product,
)
from ttt_mixer.ops.ttt_family.spec import FamilySpec
from ttt_mixer.ops.ttt_family.state import State, pack_family_state, unpack_family_state
from ttt_mixer.ops.ttt_family.step import per_matrix_lr, token_scales

# the sources of the dual coefficients: the start weights W, the carried update D and momentum S,
# then one unit -lr_j G_j per cell j
SOURCE_W, SOURCE_D, SOURCE_S, FIRST_CELL = 0, 1, 2, 3


def dual_coefficients(
    eta: torch.Tensor, alpha: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update D_i after each cell i and the momentum S_b after the last, as coefficients of the
    sources (W, D_0, S_0, -lr_1 G_1, ..., -lr_b G_b), for gates eta, alpha and the mask of real
    cells, all [..., b]: S_i = eta_i S_{i-1} - lr_i G_i and D_i = (1 - alpha_i) D_{i-1} - alpha_i W + S_i
    on real cells; empty cells change nothing. Returns ([..., b, 3 + b], [..., 3 + b])."""
    b = eta.shape[-1]
    sources = torch.eye(FIRST_CELL + b, dtype=eta.dtype, device=eta.device)
    update = sources[SOURCE_D].expand(*eta.shape[:-1], -1)
    momentum = sources[SOURCE_S].expand(*eta.shape[:-1], -1)
    rows = []
    for cell in range(b):
        real = active[..., cell, None]
        gate_eta, gate_alpha = eta[..., cell, None], alpha[..., cell, None]
        new_momentum = gate_eta * momentum + sources[FIRST_CELL + cell]
        new_update = (1.0 - gate_alpha) * update - gate_alpha * sources[SOURCE_W] + new_momentum
        momentum = torch.where(real, new_momentum, momentum)
        update = torch.where(real, new_update, update)
        rows.append(update)
    return torch.stack(rows, dim=-2), momentum


def apply_coefficients(
    coefficients: torch.Tensor,
    carried: dict[int, torch.Tensor],
    key_inputs: torch.Tensor,
    key_grads: torch.Tensor,
    lr: torch.Tensor,
) -> torch.Tensor:
    """sum over the sources of coefficient * source, for one matrix: coefficients [NH, 3 + b], the
    carried sources by index (W, D, S: [NH, d_in, d_out]), the cells' key inputs [NH, b, d_in] and
    output gradients [NH, b, d_out], lr [NH, b]."""
    total = -key_inputs.transpose(-1, -2) @ ((coefficients[:, FIRST_CELL:] * lr)[..., None] * key_grads)
    for source, tensor in carried.items():
        total = total + coefficients[:, source, None, None] * tensor
    return total


def dual_product(
    rows: torch.Tensor,
    carried: list[dict[int, torch.Tensor]],
    key_inputs: list[torch.Tensor],
    key_grads: list[torch.Tensor],
    lr: torch.Tensor,
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``product(m, x)`` of ``inner_apply`` in the dual form: row i of x times the matrix cell i
    reads, W + tau_i D_i, without forming it. rows [NH, b, 3 + b]: the coefficients of D_i already
    scaled by tau_i; carried: the sources W, D (, S) of each matrix; lr [NH, b, n]."""

    def product(m: int, x: torch.Tensor) -> torch.Tensor:
        z = x @ carried[m][SOURCE_W]
        for source, tensor in carried[m].items():
            z = z + rows[..., source, None] * (x @ tensor)
        scores = (x @ key_inputs[m].transpose(-1, -2)) * rows[..., FIRST_CELL:] * lr[:, None, :, m]
        return z - scores @ key_grads[m]

    return product


def ttt_family_chunk(
    spec: FamilySpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_offset: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    params: Sequence[torch.Tensor],
    momentum: torch.Tensor | None = None,
    forget: torch.Tensor | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, State | None]:
    """A TTT-family member over whole sequences.

    Args:
        spec: the member (``FamilySpec``).
        q, k, v: [B, T, H, d] queries, keys and values.
        lr: [B, T, H] learning rate of every token, or [B, T, H, n] one per inner matrix (LaCT).
        token_offset: [b] offsets of the token scale tau_i (docs/math.md section 2), or None for
            tau = 1 (Titans, LaCT).
        ln_weight, ln_bias: [H, d] the inner LayerNorm of the reconstruction loss, or both None.
        params: the initial inner weights: (w1, b1[, w2, b2]) as ``ttt_chunk`` takes them, or
            (w_gate, w_up, w_down) [H, d, d] for SwiGLU; also weight normalisation's target norms.
        momentum, forget: [B, T, H] gates eta and alpha in [0, 1] when the spec has them, else None.
        initial_state: a state (``ttt_mixer.ops.ttt_family.state``) to continue from.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: [N + 1] offsets of N packed sequences in a batch of size 1.
        eps: the inner LayerNorm epsilon.

    Returns:
        o: [B, T, H, d] outputs in q's dtype, and the final state (float32, or float64 for float64
        inputs) or None.
    """
    N = check_family_inputs(
        spec,
        q,
        k,
        v,
        lr,
        token_offset,
        ln_weight,
        ln_bias,
        params,
        momentum,
        forget,
        initial_state,
        cu_seqlens,
        eps,
    )
    B, T, H = q.shape[:3]
    b = spec.mini_batch_size
    dtype = torch.promote_types(q.dtype, torch.float32)
    matrices = [m.to(dtype) for m in param_matrices(spec, params)]
    if initial_state is None:
        position = None
        weights = [m.expand(N, -1, -1, -1) for m in matrices]
        updates = [torch.zeros_like(w) for w in weights]
        momenta = [torch.zeros_like(w) for w in weights] if spec.momentum else None
        gate_sums = weights[0].new_zeros(N, H, 2) if spec.has_gate_sums else None
    else:
        state = tuple(t.to(dtype) if t.is_floating_point() else t for t in initial_state)
        position, weights, updates, momenta, gate_sums = unpack_family_state(spec, state)

    grid = MiniBatchGrid(B, T, cu_seqlens, position, b, device=q.device)
    M = grid.num_minibatches

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, ...] -> [N * H, M, b, ...]
        return grid.to_grid(x.to(dtype)).movedim(3, 1).flatten(0, 1)

    qh, kh, vh = (heads_first(t) for t in (q, k, v))
    lrh = heads_first(per_matrix_lr(spec, lr))  # [NH, M, b, n]
    active = heads_first(q.new_ones(B, T, H)) > 0
    zeros = torch.zeros_like(active, dtype=dtype)
    eta = zeros if momentum is None else heads_first(momentum)
    alpha = zeros if forget is None else heads_first(forget)
    tau = token_scales(spec, token_offset, dtype).to(q.device)
    ln = (None, None) if ln_weight is None else (ln_weight.to(dtype), ln_bias.to(dtype))
    lnw, lnb = (None, None) if ln[0] is None else (t.repeat(N, 1)[:, None] for t in ln)
    complete = grid.complete.repeat_interleave(H, dim=0)[:, :, None, None]  # [NH, M, 1, 1]
    targets = [t.repeat(N, 1, 1) for t in column_norms(matrices)] if spec.weight_norm else None

    weights, updates = [w.flatten(0, 1) for w in weights], [u.flatten(0, 1) for u in updates]
    momenta = None if momenta is None else [s.flatten(0, 1) for s in momenta]
    gate_sums = None if gate_sums is None else gate_sums.flatten(0, 1)
    if spec.order == "dual":
        update_rows, momentum_last = dual_coefficients(eta, alpha, active)
        # the token scale of the reading cell multiplies its row; W enters as W + tau_i D_i
        scaled_rows = tau[:, None] * update_rows

    outputs = []
    for m in range(M):
        x_keys, g_keys = key_gradients(spec, kh[:, m], vh[:, m], weights, lnw, lnb, eps)
        lr_m = lrh[:, m]
        done = complete[:, m]
        if spec.order == "dual":
            carried = [{SOURCE_W: w, SOURCE_D: u} for w, u in zip(weights, updates, strict=True)]
            for sources, s in zip(carried, momenta or (), strict=False):
                sources[SOURCE_S] = s
            product = dual_product(scaled_rows[:, m], carried, x_keys, g_keys, lr_m)
            outputs.append(inner_apply(spec, qh[:, m], product))
            last = update_rows[:, m, -1]
            new_updates = [
                apply_coefficients(last, sources, x, g, lr_m[..., j])
                for j, (sources, x, g) in enumerate(zip(carried, x_keys, g_keys, strict=True))
            ]
            if momenta is not None:
                momenta = [
                    apply_coefficients(momentum_last[:, m], {SOURCE_S: s}, x, g, lr_m[..., j])
                    for j, (s, x, g) in enumerate(zip(momenta, x_keys, g_keys, strict=True))
                ]
            weights = [
                torch.where(done, w + tau[-1] * u, w) for w, u in zip(weights, new_updates, strict=True)
            ]
            updates = [torch.where(done, 0.0, u) for u in new_updates]
            continue
        outputs.append(inner_apply(spec, qh[:, m], plain_product(weights)))
        updates = [
            u - x.transpose(-1, -2) @ (lr_m[..., j, None] * g)
            for j, (u, x, g) in enumerate(zip(updates, x_keys, g_keys, strict=True))
        ]
        if gate_sums is not None:
            gate_sums = gate_sums + torch.stack([eta[:, m].sum(-1), alpha[:, m].sum(-1)], dim=-1)
        weights, updates, momenta, gate_sums = finish_minibatch(
            spec, done, weights, updates, momenta, gate_sums, tau[-1], targets
        )

    z = torch.stack(outputs, dim=1).unflatten(0, (N, H)).movedim(1, 3)  # [N, M, b, H, d]
    qg = grid.to_grid(q.to(dtype))
    o = grid.from_grid(inner_output(qg, z, *ln, eps), B, T).to(q.dtype)
    if not output_final_state:
        return o, None

    def per_sequence(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(0, (N, H))

    return o, pack_family_state(
        grid.final_position,
        [per_sequence(w) for w in weights],
        [per_sequence(u) for u in updates],
        None if momenta is None else [per_sequence(s) for s in momenta],
        None if gate_sums is None else per_sequence(gate_sums),
    )
