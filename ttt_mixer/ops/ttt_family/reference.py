"""The reference form of the TTT family, token by token (docs/math.md section 13): the ground truth
for the chunked form and the decode step, and itself held to ``ttt_primal`` at the default spec.

Deliberately plain: one sequence and one token at a time; each token's loss written out
(1/2 ||f(k) - v||^2 with F.layer_norm, or -<f_res(k), v>) and differentiated by autograd at the
mini-batch's start weights (``create_graph`` keeps the outer gradient); then the state transition
``read_and_update`` of the decode step. Slow; meant for tests in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ttt_mixer.ops.ttt_family.checks import check_family_inputs
from ttt_mixer.ops.ttt_family.inner import column_norms, inner_forward, param_matrices
from ttt_mixer.ops.ttt_family.spec import FamilySpec
from ttt_mixer.ops.ttt_family.state import State, family_state_weights, initial_family_state
from ttt_mixer.ops.ttt_family.step import per_matrix_lr, read_and_update, token_scales


def reference_inner_function(
    spec: FamilySpec,
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """f(x; W) for x [H, n, d]: x + LN(f_res(x)) with an inner LayerNorm ([H, 1, d]), else f_res(x)."""
    z = inner_forward(spec, x, weights)
    if ln_weight is None:
        return z
    return x + F.layer_norm(z, z.shape[-1:], eps=eps) * ln_weight + ln_bias


def reference_token_loss(spec: FamilySpec, prediction: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The inner loss of one token's prediction f(k), summed over the heads (which share no weight)."""
    if spec.loss == "dot_product":
        return -(prediction * v).sum()
    return 0.5 * (prediction - v).square().sum()


def ttt_family_reference(
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
    """Same arguments and results as ``ttt_family_chunk``, token by token."""
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
    B, T, H, d = q.shape
    matrices = param_matrices(spec, params)
    targets = column_norms(matrices) if spec.weight_norm else None
    tau = token_scales(spec, token_offset, q.dtype).to(q.device)
    lnw, lnb = (None, None) if ln_weight is None else (ln_weight[:, None], ln_bias[:, None])
    lr = per_matrix_lr(spec, lr)
    flat = [None if t is None else t.reshape(B * T, *t.shape[2:]) for t in (q, k, v, lr, momentum, forget)]
    if cu_seqlens is None:
        bounds = [(n * T, (n + 1) * T) for n in range(B)]
    else:
        bounds = list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True))
    if initial_state is None:
        initial_state = initial_family_state(spec, matrices, num_sequences)

    outputs: list[torch.Tensor | None] = [None] * (B * T)
    finals = []
    for n, (start, end) in enumerate(bounds):
        state = tuple(t[n : n + 1] for t in initial_state)
        for t in range(start, end):
            qt, kt, vt, lrt, eta, alpha = (None if x is None else x[t : t + 1] for x in flat)
            weights = family_state_weights(spec, state)
            leaves = [w[0].detach().requires_grad_() if not w.requires_grad else w[0] for w in weights]
            prediction = reference_inner_function(spec, kt[0][:, None], leaves, lnw, lnb, eps)
            loss = reference_token_loss(spec, prediction, vt[0][:, None])
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            read, state = read_and_update(
                spec, tau, state, [g[None] for g in grads], lrt, eta, alpha, targets
            )
            query = qt[0][:, None]
            outputs[t] = reference_inner_function(spec, query, [r[0] for r in read], lnw, lnb, eps)[:, 0]
        finals.append(state)

    o = torch.stack(outputs).reshape(B, T, H, d)
    if not output_final_state:
        return o, None
    return o, tuple(torch.cat(parts) for parts in zip(*finals, strict=True))
