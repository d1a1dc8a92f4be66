"""The reference form of the TTT family, token by token (docs/math.md sections 3 and 13): the ground
truth for every other path (chunked, decode step, Triton), float64-capable.

Deliberately plain: one sequence and one token at a time; each token's loss written out
(1/2 ||f(k) - v||^2 with F.layer_norm, or -<f_res(k), v>) and differentiated by autograd at the
mini-batch's start weights (``create_graph`` keeps the outer gradient); then the state transition
``read_and_update`` of the decode step. Slow; meant for tests in float64. ``ttt_primal`` is TTT-Linear
and TTT-MLP in the arguments of ``ttt_chunk``.

The closed forms here (``reference_*``: the LayerNorm-L2 gradient, the loss target and gradient,
gelu') are the reference for the fast pieces of ``ttt_mixer.ops.ttt.inner`` (LayerNormL2Grad,
loss_offset / output_gradient, GeluTanhWithGrad), which the tests hold to them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ttt_mixer.ops.ttt.checks import check_inputs, mini_batch_size_of
from ttt_mixer.ops.ttt.inner import (
    GELU_CUBIC,
    SQRT_2_OVER_PI,
    inner_forward,
    layer_norm_backward,
    param_matrices,
    token_scales,
)
from ttt_mixer.ops.ttt.spec import FamilySpec, ttt_spec
from ttt_mixer.ops.ttt.state import State, pack_matrices, state_matrices
from ttt_mixer.ops.ttt.state import initial_state as make_initial_state
from ttt_mixer.ops.ttt.step import matrix_rates, read_and_update
from ttt_mixer.ops.ttt.update import column_norms


def reference_ln_fused_l2_grad(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """d/dz of 1/2 ||LN(z) - target||^2, the LayerNorm backward fused with the L2 loss (closed form)."""
    centred = z - z.mean(dim=-1, keepdim=True)
    # the variance as a mean of squares: Tensor.var is several times slower on small rows
    rstd = torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    z_hat = centred * rstd
    grad_hat = (weight * z_hat + bias - target) * weight
    return layer_norm_backward(grad_hat, z_hat, rstd)


def reference_loss_target(k: torch.Tensor, v: torch.Tensor, ln_weight: torch.Tensor | None) -> torch.Tensor:
    """What f_res must reproduce: XV - XK when f(z) = z + LN(f_res(z)), XV when f = f_res."""
    return v if ln_weight is None else v - k


def reference_loss_grad(
    z: torch.Tensor,
    target: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """dl/dZ of the last inner layer; ln_weight None means f = f_res (no LayerNorm, no residual)."""
    return z - target if ln_weight is None else reference_ln_fused_l2_grad(z, target, ln_weight, ln_bias, eps)


def reference_gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """Derivative of gelu(x, approximate='tanh')."""
    tanh_u = torch.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x**3))
    return 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u**2) * SQRT_2_OVER_PI * (1.0 + 3 * GELU_CUBIC * x**2)


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
    B, T, H, d = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    matrices = param_matrices(spec, [p.to(dtype) for p in params])
    targets = column_norms(matrices) if spec.weight_norm else None
    tau = token_scales(spec, token_offset, dtype, q.device)
    lnw, lnb = (
        (None, None) if ln_weight is None else (ln_weight.to(dtype)[:, None], ln_bias.to(dtype)[:, None])
    )
    flat = [
        None if t is None else t.to(dtype).reshape(B * T, *t.shape[2:])
        for t in (q, k, v, lr, momentum, forget)
    ]
    if cu_seqlens is None:
        bounds = [(n * T, (n + 1) * T) for n in range(B)]
    else:
        bounds = list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True))
    if initial_state is None:
        initial_state = make_initial_state(spec, [p.to(dtype) for p in params], num_sequences)

    outputs: list[torch.Tensor | None] = [None] * (B * T)
    finals = []
    for n, (start, end) in enumerate(bounds):
        state = state_matrices(spec, tuple(t[n : n + 1] for t in initial_state))
        for t in range(start, end):
            qt, kt, vt, lrt, eta, alpha = (None if x is None else x[t : t + 1] for x in flat)
            leaves = [w[0].detach().requires_grad_() if not w.requires_grad else w[0] for w in state[1]]
            prediction = reference_inner_function(spec, kt[0][:, None], leaves, lnw, lnb, eps)
            loss = reference_token_loss(spec, prediction, vt[0][:, None])
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            rates = matrix_rates(spec, lrt, per_matrix=lr.dim() == 4)
            steps = [rate * g[None] for rate, g in zip(rates, grads, strict=True)]
            read, state = read_and_update(spec, tau, state, steps, eta, alpha, targets)
            query = qt[0][:, None]
            outputs[t] = reference_inner_function(spec, query, [r[0] for r in read], lnw, lnb, eps)[:, 0]
        finals.append(pack_matrices(spec, *state))

    o = torch.stack(outputs).reshape(B, T, H, d).to(q.dtype)
    if not output_final_state:
        return o, None
    return o, tuple(torch.cat(parts) for parts in zip(*finals, strict=True))


def ttt_primal(
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
    """TTT-Linear or TTT-MLP token by token (``ttt_family_reference`` at ``ttt_spec``); arguments and
    results as for ``ttt_chunk``."""
    spec = ttt_spec(inner_model, mini_batch_size_of(token_offset))
    return ttt_family_reference(
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
