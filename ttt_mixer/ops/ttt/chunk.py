"""The chunked form of every TTT-family op in PyTorch (docs/math.md sections 4 and 13): the path used
where Triton is not.

Only the weight recurrence runs mini-batch by mini-batch (one matmul per matrix for the gradients and
one for the update); everything that does not feed the next mini-batch's weights (the first
matrices' dual-form scores, the output LayerNorm) runs once over all mini-batches.

In the dual order each token reads W - tau_i S_i, where S_i, the mini-batch's accumulated update up
to token i, is a combination of the start weights W, the carried sums S and momentum M, and each
cell's lr_j G_j, whose coefficients depend on the gates alone (``dual_coefficients``); for TTT they
are those of docs/math.md section 4 (S_i = S + sum_{j <= i} lr_j G_j). A mini-batch's outputs are its
dual form with those coefficients, without forming any token's weights. In the apply-then-update
order a mini-batch's queries read its start weights, and its gradient sum is folded in at its end
(``finish_minibatch``). ``ttt_chunk`` is TTT-Linear and TTT-MLP in their own arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ttt_mixer.ops.ttt.checks import check_inputs, mini_batch_size_of
from ttt_mixer.ops.ttt.grid import MiniBatchGrid
from ttt_mixer.ops.ttt.inner import (
    FIRST_MATRICES,
    first_input,
    inner_apply,
    inner_output,
    key_gradients,
    loss_offset,
    param_matrices,
    plain_product,
    token_scales,
)
from ttt_mixer.ops.ttt.spec import FamilySpec, ttt_spec
from ttt_mixer.ops.ttt.state import State, pack_matrices, state_matrices
from ttt_mixer.ops.ttt.update import column_norms, finish_minibatch

# the sources of the dual coefficients: the start weights W, the carried sums S and momentum M,
# then one unit lr_j G_j per cell j
SOURCE_W, SOURCE_S, SOURCE_M, FIRST_CELL = 0, 1, 2, 3


def dual_coefficients(
    eta: torch.Tensor, alpha: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums S_i after each cell i and the momentum M_b after the last, as coefficients of the
    sources (W, S_0, M_0, lr_1 G_1, ..., lr_b G_b), for gates eta, alpha and the mask of real cells,
    all [..., b]: M_i = eta_i M_{i-1} + lr_i G_i and S_i = (1 - alpha_i) S_{i-1} + alpha_i W + M_i on
    real cells; empty cells change nothing. Returns ([..., b, 3 + b], [..., 3 + b])."""
    b = eta.shape[-1]
    sources = torch.eye(FIRST_CELL + b, dtype=eta.dtype, device=eta.device)
    sums = sources[SOURCE_S].expand(*eta.shape[:-1], -1)
    momentum = sources[SOURCE_M].expand(*eta.shape[:-1], -1)
    rows = []
    for cell in range(b):
        real = active[..., cell, None]
        gate_eta, gate_alpha = eta[..., cell, None], alpha[..., cell, None]
        new_momentum = gate_eta * momentum + sources[FIRST_CELL + cell]
        new_sums = (1.0 - gate_alpha) * sums + gate_alpha * sources[SOURCE_W] + new_momentum
        momentum = torch.where(real, new_momentum, momentum)
        sums = torch.where(real, new_sums, sums)
        rows.append(sums)
    return torch.stack(rows, dim=-2), momentum


def apply_coefficients(
    coefficients: torch.Tensor,
    carried: dict[int, torch.Tensor],
    scaled_inputs: torch.Tensor,
    key_grads: torch.Tensor,
) -> torch.Tensor:
    """sum over the sources of coefficient * source, for one matrix: coefficients [NH, 3 + b], the
    carried sources by index ([NH, d_in, d_out]), the cells' key inputs times their lr, transposed
    [NH, d_in, b], and output gradients [NH, b, d_out]."""
    total = scaled_inputs @ (coefficients[:, FIRST_CELL:, None] * key_grads)
    for source, tensor in carried.items():
        total = total + coefficients[:, source, None, None] * tensor
    return total


def dual_product(
    weights: list[torch.Tensor],
    key_inputs: list[torch.Tensor],
    key_grads: list[torch.Tensor],
    first_scores: dict[int, torch.Tensor],
    coefficients: list[torch.Tensor],
    carried: dict[int, list[torch.Tensor]],
    read_rows: torch.Tensor,
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``product(j, x)`` of ``inner_apply`` in the dual form of one mini-batch: row i of x times the
    matrix j that cell i reads, W - tau_i S_i, without forming it. key_inputs, key_grads: the cells'
    X_j [NH, b, d_in] and g_j [NH, b, d_out]; first_scores: the scores of the matrices that read the
    input itself, computed for all mini-batches at once; coefficients[j] [NH, b, b]: tau_i times the
    coefficient of cell c's lr_c G_c in S_i; carried: the other sources whose terms reach the reads
    (W with forgetting, M, the sums S of a state), each per matrix; read_rows [..., b, 3]: tau_i times
    their coefficients."""

    def product(j: int, x: torch.Tensor) -> torch.Tensor:
        if j in first_scores:
            scores = first_scores[j]
        else:
            scores = (x @ key_inputs[j].transpose(-1, -2)) * coefficients[j]
        z = x_w = x @ weights[j]
        for source, tensors in carried.items():
            term = x_w if source == SOURCE_W else x @ tensors[j]
            z = z - read_rows[..., source, None] * term
        return torch.baddbmm(z, scores, key_grads[j], alpha=-1)

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
        spec: the member (``FamilySpec``; ``ttt_spec`` for TTT-Linear and TTT-MLP).
        q, k, v: [B, T, H, d] queries, keys and values (after any RoPE or convolution).
        lr: [B, T, H] learning rate lr_j of every token (TTT: base lr * sigmoid(gate) / d, docs/math.md
            section 2), or [B, T, H, n] one per inner matrix (LaCT).
        token_offset: [b] learnable offsets eps_i of the token scale tau_i (docs/math.md section 2),
            b the spec's mini-batch size, or None for tau = 1 (Titans, LaCT).
        ln_weight, ln_bias: [H, d] the inner LayerNorm of the reconstruction loss, or both None for
            f(z) = f_res(z) (no LayerNorm, no residual: the setting of docs/math.md section 11).
        params: the initial inner weights (``param_names``): (w1, b1[, w2, b2]) with w [H, d_in,
            d_out] and b [H, d_out], or (w_gate, w_up, w_down) [H, d, d] for SwiGLU; used when
            ``initial_state`` is None; also weight normalisation's target norms.
        momentum, forget: [B, T, H] gates eta and alpha in [0, 1] when the spec has them, else None.
        initial_state: a state (``ttt_mixer.ops.ttt.state``) to continue from, possibly in the middle
            of a mini-batch, one per sequence.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: [N + 1] offsets of N packed sequences in a batch of size 1.
        eps: the inner LayerNorm epsilon.

    Returns:
        o: [B, T, H, d] outputs in q's dtype (XQ + LN(f_res(XQ; W_bar)) with the inner LayerNorm), and
        the final state (float32, or float64 for float64 inputs) or None.
    """
    params = list(params)
    N = check_inputs(
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
    b, n = spec.mini_batch_size, spec.num_matrices
    dtype = torch.promote_types(q.dtype, torch.float32)
    gated = spec.momentum or spec.forgetting
    if initial_state is None:
        # without a state there are no sums at all (None), which lets the loop skip their terms and,
        # for TTT, fold tau_b into the learning rates
        position = sums = None
        weights = [m.to(dtype).expand(N, -1, -1, -1) for m in param_matrices(spec, params)]
        momenta = [torch.zeros_like(w) for w in weights] if spec.momentum else None
        gate_sums = weights[0].new_zeros(N, H, 2) if spec.has_gate_sums else None
    else:
        # check_inputs holds the state to the compute dtype
        position, weights, sums, momenta, gate_sums = state_matrices(spec, initial_state)

    grid = MiniBatchGrid(B, T, cu_seqlens, position, b, device=q.device)
    M = grid.num_minibatches

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        # [N, M, b, H, ...] -> [N * H, M, b, ...]
        return x.movedim(3, 1).flatten(0, 1)

    qg, kg, vg = (grid.to_grid(t.to(dtype)) for t in (q, k, v))  # [N, M, b, H, d]
    # the heads move first before the ones are appended so that q and k are copied once
    q1, k1 = (first_input(spec, t.movedim(3, 1)).flatten(0, 1) for t in (qg, kg))
    lr_cells = heads_first(grid.to_grid(lr.to(dtype)))  # [N * H, M, b] or [N * H, M, b, n]
    lr_matrices = [lr_cells if lr.dim() == 3 else lr_cells[..., j] for j in range(n)]
    tau = token_scales(spec, token_offset, dtype, q.device)
    ln = (None, None) if ln_weight is None else (ln_weight.to(dtype), ln_bias.to(dtype))
    lnw = None if ln[0] is None else ln[0].repeat(N, 1)[:, None]  # [N * H, 1, d]
    offsets = heads_first(loss_offset(spec, kg, vg, *ln)).unbind(1)
    complete = grid.complete.repeat_interleave(H, dim=0)[:, :, None, None]  # [N * H, M, 1, 1]
    targets = None
    if spec.weight_norm:
        targets = [
            t.repeat(N, 1, 1) for t in column_norms([m.to(dtype) for m in param_matrices(spec, params)])
        ]
    weights = [w.flatten(0, 1) for w in weights]
    sums = None if sums is None else [s.flatten(0, 1) for s in sums]
    momenta = None if momenta is None else [s.flatten(0, 1) for s in momenta]
    gate_sums = None if gate_sums is None else gate_sums.flatten(0, 1)
    if gated:
        active = heads_first(grid.to_grid(q.new_ones(B, T, H))) > 0
        zeros = torch.zeros_like(active, dtype=dtype)
        eta = zeros if momentum is None else heads_first(grid.to_grid(momentum.to(dtype)))
        alpha = zeros if forget is None else heads_first(grid.to_grid(forget.to(dtype)))

    # unbound once, so that the backward pass does not zero-fill a full-size gradient for every
    # mini-batch's slice; [N * H, b, ...] each: 3-D for (b)addbmm
    q_mb, k_mb = q1.unbind(1), k1.unbind(1)
    if spec.order == "dual":
        if gated:
            sum_rows, momentum_last = dual_coefficients(eta, alpha, active)
            # token i reads W - tau_i S_i: the coefficients of its read, scaled by tau_i
            read_rows = tau[:, None] * sum_rows  # [N * H, M, b, 3 + b]

            def read_coefficients(lr_j: torch.Tensor) -> torch.Tensor:
                return read_rows[..., FIRST_CELL:] * lr_j[..., None, :]
        else:
            # the carried sums enter every read with coefficient tau_i, and nothing else does
            plain_rows = torch.zeros(b, FIRST_CELL, dtype=dtype, device=q.device)
            plain_rows[:, SOURCE_S] = tau

            def read_coefficients(lr_j: torch.Tensor) -> torch.Tensor:
                # tau_i * lr_j for j <= i inside each mini-batch
                return (tau[:, None] * lr_j[..., None, :]).tril()

        shared = read_coefficients(lr_matrices[0]) if lr.dim() == 3 else None
        coefficients = [shared if shared is not None else read_coefficients(lr_j) for lr_j in lr_matrices]
        # the first matrices' dual-form scores depend on the inputs alone: all mini-batches at once
        query_keys = q1 @ k1.transpose(-1, -2)
        first_scores = {j: (query_keys * coefficients[j]).unbind(1) for j in FIRST_MATRICES[spec.inner_model]}
        coefficients_mb = [c.unbind(1) for c in coefficients]
    # with whole mini-batches only and no state, TTT's end-of-mini-batch scale tau_b folds into the
    # learning rates and each update is one baddbmm; otherwise the unscaled sums are kept
    whole_minibatches = spec.order == "dual" and not gated and grid.all_complete and sums is None
    lr_mb = [(lr_j * tau[-1] if whole_minibatches else lr_j)[..., None].unbind(1) for lr_j in lr_matrices]

    outputs = []
    for m in range(M):
        x_m, g_m = key_gradients(spec, k_mb[m], offsets[m], weights, lnw, eps)
        scaled_inputs = [(lr_mb[j][m] * x).transpose(-1, -2) for j, x in enumerate(x_m)]
        done = complete[:, m]
        if spec.order == "apply_then_update":
            outputs.append(inner_apply(spec, q_mb[m], plain_product(weights)))
            step_sums = [x @ g for x, g in zip(scaled_inputs, g_m, strict=True)]
            sums = step_sums if sums is None else [s + u for s, u in zip(sums, step_sums, strict=True)]
            if gate_sums is not None:
                gate_sums = gate_sums + torch.stack([eta[:, m].sum(-1), alpha[:, m].sum(-1)], dim=-1)
            weights, sums, momenta, gate_sums = finish_minibatch(
                spec, done, weights, sums, momenta, gate_sums, tau[-1], targets
            )
            continue

        carried = {SOURCE_W: weights} if spec.forgetting else {}
        if momenta is not None:
            carried[SOURCE_M] = momenta
        if m == 0 and sums is not None:
            # the sums of a state read mid-mini-batch only reach its first mini-batch
            carried[SOURCE_S] = sums
        product = dual_product(
            weights,
            x_m,
            g_m,
            {j: scores[m] for j, scores in first_scores.items()},
            [c[m] for c in coefficients_mb],
            carried,
            read_rows[:, m, :, :FIRST_CELL] if gated else plain_rows,
        )
        outputs.append(inner_apply(spec, q_mb[m], product))
        if whole_minibatches:
            weights = [
                torch.baddbmm(w, x, g, alpha=-1) for w, x, g in zip(weights, scaled_inputs, g_m, strict=True)
            ]
            continue
        if gated:
            last = sum_rows[:, m, -1]
            new_sums = []
            for j, (w, x, g) in enumerate(zip(weights, scaled_inputs, g_m, strict=True)):
                sources = {SOURCE_W: w} if spec.forgetting else {}
                if sums is not None:
                    sources[SOURCE_S] = sums[j]
                if momenta is not None:
                    sources[SOURCE_M] = momenta[j]
                new_sums.append(apply_coefficients(last, sources, x, g))
            if momenta is not None:
                momenta = [
                    apply_coefficients(momentum_last[:, m], {SOURCE_M: s}, x, g)
                    for s, x, g in zip(momenta, scaled_inputs, g_m, strict=True)
                ]
        else:
            new_sums = [x @ g for x, g in zip(scaled_inputs, g_m, strict=True)]
            if sums is not None:
                new_sums = [s + u for s, u in zip(sums, new_sums, strict=True)]
        updated = [w - tau[-1] * s for w, s in zip(weights, new_sums, strict=True)]
        weights = [torch.where(done, u, w) for u, w in zip(updated, weights, strict=True)]
        sums = [torch.where(done, 0.0, s) for s in new_sums]

    z = torch.stack(outputs, dim=1).unflatten(0, (N, H)).movedim(1, 3)  # [N, M, b, H, d]
    o = grid.from_grid(inner_output(qg, z, *ln, eps), B, T).to(q.dtype)
    if not output_final_state:
        return o, None

    def per_sequence(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(0, (N, H))

    final_sums = sums if sums is not None else [torch.zeros_like(w) for w in weights]
    return o, pack_matrices(
        spec,
        grid.final_position,
        [per_sequence(w) for w in weights],
        [per_sequence(s) for s in final_sums],
        None if momenta is None else [per_sequence(s) for s in momenta],
        None if gate_sums is None else per_sequence(gate_sums),
    )


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
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, State | None]:
    """TTT-Linear (``inner_model="linear"``) or TTT-MLP (``"mlp"``) over whole sequences in the dual
    form: ``ttt_family_chunk`` at ``ttt_spec(inner_model, b)``, b the length of ``token_offset``;
    ``params`` (w1, b1[, w2, b2])."""
    spec = ttt_spec(inner_model, mini_batch_size_of(token_offset))
    return ttt_family_chunk(
        spec,
        q,
        k,
        v,
        lr,
        token_offset,
        ln_weight,
        ln_bias,
        params,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        eps=eps,
    )
