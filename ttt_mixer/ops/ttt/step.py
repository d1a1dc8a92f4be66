"""One decoding step of a TTT-family op: every sequence reads one token at its own position in its
mini-batch (docs/math.md sections 6 and 13). Its cost does not depend on how many tokens came before.
``read_and_update`` is the state transition of one token, which the reference
(``ttt_family_reference``) applies token by token with gradients from autograd; ``ttt_step`` is
TTT-Linear and TTT-MLP in the arguments of ``ttt_chunk``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttt_mixer.ops.ttt.checks import check_decode_step, check_inputs, mini_batch_size_of
from ttt_mixer.ops.ttt.inner import (
    first_input,
    inner_forward,
    inner_output,
    key_gradients,
    loss_offset,
    param_matrices,
    token_scales,
)
from ttt_mixer.ops.ttt.spec import FamilySpec, ttt_spec
from ttt_mixer.ops.ttt.state import Matrices, State, pack_matrices, state_matrices
from ttt_mixer.ops.ttt.update import column_norms, finish_minibatch

# (position, weights, sums, momenta or None, gate sums or None), as ``state_matrices`` gives them
MatrixState = tuple[torch.Tensor, Matrices, Matrices, Matrices | None, torch.Tensor | None]


def matrix_rates(spec: FamilySpec, lr: torch.Tensor, per_matrix: bool) -> list[torch.Tensor]:
    """The learning rate of every inner matrix, [N, H, 1, 1] each, from lr [N, H, n] (``per_matrix``)
    or [N, H] shared by all."""
    if per_matrix:
        return [lr[..., m, None, None] for m in range(spec.num_matrices)]
    return [lr[..., None, None]] * spec.num_matrices


def read_and_update(
    spec: FamilySpec,
    tau: torch.Tensor,
    state: MatrixState,
    steps: Sequence[torch.Tensor],
    eta: torch.Tensor | None,
    alpha: torch.Tensor | None,
    target_norms: list[torch.Tensor] | None,
) -> tuple[Matrices, MatrixState]:
    """One token per sequence: (the matrices its query reads, the state after it).

    steps: the token's loss gradient G of every matrix at the state's start weights times its learning
    rate, lr G [N, H, d_in, d_out]; eta, alpha [N, H] gates or None. Dual order: M <- eta M + lr G,
    S <- (1 - alpha) S + alpha W + M (M = lr G without momentum, S + M without forgetting), the query
    reads W - tau_i S, and the mini-batch's last token makes that the next start. Apply-then-update:
    the query reads W, S <- S + lr G, and the mini-batch's last token applies ``finish_minibatch``."""
    position, weights, sums, momenta, gate_sums = state
    done = (position + 1 == spec.mini_batch_size)[:, None, None, None]
    if spec.order == "dual":
        if momenta is not None:
            gate = eta[..., None, None]
            momenta = [torch.addcmul(u, gate, s) for s, u in zip(momenta, steps, strict=True)]
            steps = momenta
        if alpha is not None:
            a = alpha[..., None, None]
            # (1 - alpha) S + alpha W + M
            sums = [torch.lerp(s, w, a) + u for s, w, u in zip(sums, weights, steps, strict=True)]
        else:
            sums = [s + u for s, u in zip(sums, steps, strict=True)]
        tau_i = tau[position][:, None, None, None]
        read = [torch.addcmul(w, tau_i, s, value=-1.0) for w, s in zip(weights, sums, strict=True)]
        weights = [torch.where(done, r, w) for r, w in zip(read, weights, strict=True)]
        sums = [torch.where(done, 0.0, s) for s in sums]
    else:
        read = weights
        sums = [s + u for s, u in zip(sums, steps, strict=True)]
        if gate_sums is not None:
            zero = torch.zeros_like(eta if alpha is None else alpha)
            gates = [zero if gate is None else gate for gate in (eta, alpha)]
            gate_sums = gate_sums + torch.stack(gates, dim=-1)
        weights, sums, momenta, gate_sums = finish_minibatch(
            spec, done, weights, sums, momenta, gate_sums, tau[-1], target_norms
        )
    new_position = (position + 1) % spec.mini_batch_size
    return read, (new_position, weights, sums, momenta, gate_sums)


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
    params = list(params)
    num_sequences = check_inputs(
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
    lengths = None if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).to(q.device)
    if initial_state is None:
        matrices = [m.to(dtype) for m in param_matrices(spec, params)]
        N = num_sequences
        zeros = [m.new_zeros(N, *m.shape) for m in matrices]
        state = (
            torch.zeros(N, dtype=torch.long, device=q.device),
            [m.expand(N, *m.shape) for m in matrices],
            zeros,
            zeros if spec.momentum else None,
            matrices[0].new_zeros(N, H, 2) if spec.has_gate_sums else None,
        )
    else:
        # check_inputs holds the state to the compute dtype
        state = state_matrices(spec, initial_state)

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
    lrn, eta, alpha = per_sequence(lr), per_sequence(momentum), per_sequence(forget)
    lnw, lnb = (
        (None, None) if ln_weight is None else (ln_weight.to(dtype)[:, None], ln_bias.to(dtype)[:, None])
    )
    offset = loss_offset(spec, kn, vn, lnw, lnb)
    inputs, output_grads = key_gradients(spec, first_input(spec, kn), offset, state[1], lnw, eps)
    rates = matrix_rates(spec, lrn, per_matrix=lr.dim() == 4)
    # lr G = (lr X)^T g: the rate scales the inputs, the smaller side
    steps = [(rate * x).transpose(-1, -2) @ g for rate, x, g in zip(rates, inputs, output_grads, strict=True)]
    targets = None
    if spec.weight_norm:
        targets = column_norms([m.to(dtype) for m in param_matrices(spec, params)])
    tau = token_scales(spec, token_offset, dtype, q.device)
    read, new_state = read_and_update(spec, tau, state, steps, eta, alpha, targets)
    o = inner_output(qn, inner_forward(spec, qn, read), lnw, lnb, eps).squeeze(2)
    if lengths is not None:
        # tokens are packed in sequence order, so the sequences that hold one give the output rows
        o = o[lengths > 0]
    o = o.reshape(B, T, H, d).to(q.dtype)
    if not output_final_state:
        return o, None
    final = pack_matrices(spec, *new_state)
    if lengths is not None:
        kept = pack_matrices(spec, *state)
        keep = lengths > 0
        final = tuple(
            torch.where(keep.reshape(-1, *[1] * (new.dim() - 1)), new, old)
            for new, old in zip(final, kept, strict=True)
        )
    return o, final


def ttt_step(
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
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, State | None]:
    """TTT-Linear or TTT-MLP on one token per sequence (``ttt_family_step`` at ``ttt_spec``);
    arguments as for ``ttt_chunk``, with T = 1 for a batch of rows or, packed, ``cu_seqlens`` whose
    sequences hold one token or none."""
    spec = ttt_spec(inner_model, mini_batch_size_of(token_offset))
    return ttt_family_step(
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
