"""One decoding step of a TTT-family op: every sequence reads one token at its own position in its
mini-batch (docs/math.md section 13). ``read_and_update`` is the state transition of one token, which
the reference (``ttt_family_reference``) applies token by token with gradients from autograd."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttt_mixer.ops.ttt.checks import check_decode_step
from ttt_mixer.ops.ttt.inner import inner_output, token_scale
from ttt_mixer.ops.ttt_family.checks import check_family_inputs
from ttt_mixer.ops.ttt_family.inner import (
    column_norms,
    finish_minibatch,
    inner_forward,
    key_gradients,
    param_matrices,
)
from ttt_mixer.ops.ttt_family.spec import FamilySpec
from ttt_mixer.ops.ttt_family.state import (
    State,
    family_state_weights,
    initial_family_state,
    pack_family_state,
    unpack_family_state,
)


def token_scales(spec: FamilySpec, token_offset: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """tau_1..tau_b (docs/math.md section 2), or ones without a token scale."""
    if token_offset is None:
        return torch.ones(spec.mini_batch_size, dtype=dtype)
    return token_scale(token_offset.to(dtype))


def per_matrix_lr(spec: FamilySpec, lr: torch.Tensor) -> torch.Tensor:
    """lr [B, T, H] (shared) or [B, T, H, n] -> [B, T, H, n], one rate per inner matrix."""
    return lr.unsqueeze(-1).expand(*lr.shape, spec.num_matrices) if lr.dim() == 3 else lr


def read_and_update(
    spec: FamilySpec,
    tau: torch.Tensor,
    state: State,
    grads: Sequence[torch.Tensor],
    lr: torch.Tensor,
    eta: torch.Tensor | None,
    alpha: torch.Tensor | None,
    target_norms: list[torch.Tensor] | None,
) -> tuple[list[torch.Tensor], State]:
    """One token per sequence: (the matrices its query reads, the state after it).

    grads: the token's loss gradient of every matrix at the state's start weights, [N, H, d_in,
    d_out]; lr [N, H, n]; eta, alpha [N, H] gates or None. Dual order: S <- eta S - lr G,
    D <- (1 - alpha) D - alpha W + S, the query reads W + tau_i D, and the mini-batch's last token
    makes that the next start. Apply-then-update: the query reads W, D <- D - lr G, and the mini-batch's
    last token applies ``finish_minibatch``."""
    position, weights, updates, momenta, gate_sums = unpack_family_state(spec, state)
    steps = [-lr[..., m, None, None] * g for m, g in enumerate(grads)]
    done = (position + 1 == spec.mini_batch_size)[:, None, None, None]
    if spec.order == "dual":
        if momenta is not None:
            momenta = [eta[..., None, None] * s + u for s, u in zip(momenta, steps, strict=True)]
            steps = momenta
        if alpha is not None:
            a = alpha[..., None, None]
            updates = [(1.0 - a) * u - a * w + s for u, w, s in zip(updates, weights, steps, strict=True)]
        else:
            updates = [u + s for u, s in zip(updates, steps, strict=True)]
        tau_i = tau[position][:, None, None, None]
        read = [w + tau_i * u for w, u in zip(weights, updates, strict=True)]
        weights = [torch.where(done, r, w) for r, w in zip(read, weights, strict=True)]
        updates = [torch.where(done, 0.0, u) for u in updates]
    else:
        read = weights
        updates = [u + s for u, s in zip(updates, steps, strict=True)]
        if gate_sums is not None:
            zero = torch.zeros_like(lr[..., 0])
            gates = [zero if gate is None else gate for gate in (eta, alpha)]
            gate_sums = gate_sums + torch.stack(gates, dim=-1)
        weights, updates, momenta, gate_sums = finish_minibatch(
            spec, done, weights, updates, momenta, gate_sums, tau[-1], target_norms
        )
    new_position = (position + 1) % spec.mini_batch_size
    return read, pack_family_state(new_position, weights, updates, momenta, gate_sums)


def ttt_family_step(
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
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, State | None]:
    """Read one token per sequence. Arguments as for ``ttt_family_chunk``, with T = 1 for a batch of
    rows or, packed, ``cu_seqlens`` whose sequences hold one token or none (a sequence without a
    token keeps its state)."""
    num_sequences = check_family_inputs(
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
    check_decode_step(q, cu_seqlens)
    B, T, H, d = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    matrices = [m.to(dtype) for m in param_matrices(spec, params)]
    if initial_state is None:
        initial_state = initial_family_state(spec, matrices, num_sequences)
    state = tuple(t.to(dtype) if t.is_floating_point() else t for t in initial_state)
    lengths = None if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).to(q.device)

    def per_sequence(x: torch.Tensor | None) -> torch.Tensor | None:
        # [B, T, H, ...] -> [N, H, ...], a zero row for a sequence without a token
        if x is None:
            return None
        x = x.to(dtype).reshape(B * T, *x.shape[2:])
        if lengths is None:
            return x
        index = torch.where(lengths > 0, cu_seqlens[:-1].to(q.device), B * T)
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[index]

    qn, kn, vn = (per_sequence(t).unsqueeze(2) for t in (q, k, v))  # [N, H, 1, d]
    lrn, eta, alpha = per_sequence(per_matrix_lr(spec, lr)), per_sequence(momentum), per_sequence(forget)
    lnw, lnb = (
        (None, None) if ln_weight is None else (ln_weight.to(dtype)[:, None], ln_bias.to(dtype)[:, None])
    )
    weights = family_state_weights(spec, state)
    inputs, output_grads = key_gradients(spec, kn, vn, weights, lnw, lnb, eps)
    grads = [x.transpose(-1, -2) @ g for x, g in zip(inputs, output_grads, strict=True)]
    targets = column_norms(matrices) if spec.weight_norm else None
    tau = token_scales(spec, token_offset, dtype).to(q.device)
    read, new_state = read_and_update(spec, tau, state, grads, lrn, eta, alpha, targets)
    o = inner_output(qn, inner_forward(spec, qn, read), lnw, lnb, eps).squeeze(2)
    if lengths is not None:
        # tokens are packed in sequence order, so the sequences that hold one give the output rows
        o = o[lengths > 0]
    o = o.reshape(B, T, H, d).to(q.dtype)
    if not output_final_state:
        return o, None
    if lengths is not None:
        keep = lengths > 0
        new_state = tuple(
            torch.where(keep.reshape(-1, *[1] * (new.dim() - 1)), new, old)
            for new, old in zip(new_state, state, strict=True)
        )
    return o, new_state
