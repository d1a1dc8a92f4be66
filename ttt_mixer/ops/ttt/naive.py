"""The primal form of TTT, token by token (docs/math.md section 3): the ground truth for every other path.

Deliberately plain: one sequence and one token at a time, weights and biases kept apart, and every
token's weights W_bar_i = W - tau_i * sum_{j <= i} lr_j G_j rebuilt from the list of its mini-batch's
gradients. Slow; meant for tests in float64.

The closed forms it uses (``reference_*``: the LayerNorm-L2 gradient, the loss target and gradient,
gelu') are the reference for the fast pieces of ``ttt_mixer.ops.ttt.inner`` (LayerNormL2Grad,
loss_offset / fused_loss_grad, GeluTanhWithGrad), which the tests hold to them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ttt_mixer.ops.ttt.checks import check_inputs
from ttt_mixer.ops.ttt.inner import (
    GELU_CUBIC,
    SQRT_2_OVER_PI,
    InnerModel,
    get_inner_model,
    inner_output,
    layer_norm_backward,
    token_scale,
)
from ttt_mixer.ops.ttt.state import pack_state, state_position, state_sums, state_weights


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


def _f_res(inner: InnerModel, x: torch.Tensor, params: list[torch.Tensor]) -> tuple[list, list]:
    """Inner model on one token per head, x [H, d]: returns (inputs, pre-activations) per layer."""
    inputs, pre = [x], [torch.einsum("hi,hio->ho", x, params[0]) + params[1]]
    if inner.num_layers == 2:
        inputs.append(F.gelu(pre[0], approximate="tanh"))
        pre.append(torch.einsum("hi,hio->ho", inputs[1], params[2]) + params[3])
    return inputs, pre


def _token_gradient(
    inner: InnerModel,
    k: torch.Tensor,
    v: torch.Tensor,
    params: list[torch.Tensor],
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> list[torch.Tensor]:
    """Gradient of 1/2 ||f(k; params) - v||^2 w.r.t. every inner parameter, in params' layout."""
    inputs, pre = _f_res(inner, k, params)
    delta = reference_loss_grad(pre[-1], reference_loss_target(k, v, ln_weight), ln_weight, ln_bias, eps)
    grads = [torch.einsum("hi,ho->hio", inputs[-1], delta), delta]
    if inner.num_layers == 2:
        delta1 = torch.einsum("ho,hio->hi", delta, params[2]) * reference_gelu_tanh_grad(pre[0])
        grads = [torch.einsum("hi,ho->hio", inputs[0], delta1), delta1, *grads]
    return grads


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
    initial_state: tuple[torch.Tensor, ...] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Same arguments and results as ``ttt_chunk``, computed in the primal form."""
    inner = get_inner_model(inner_model)
    params = list(params)
    check_inputs(inner, q, k, v, lr, token_offset, ln_weight, ln_bias, params, initial_state, cu_seqlens, eps)
    B, T, H, d = q.shape
    b = token_offset.shape[0]
    n_params = len(params)
    tau = token_scale(token_offset)
    # lr_j [H] broadcast against each inner gradient: weights [H, d_in, d_out], biases [H, d_out]
    lr_shapes = [(H, 1, 1), (H, 1)] * inner.num_layers
    flat = [t.reshape(B * T, *t.shape[2:]) for t in (q, k, v, lr)]
    if cu_seqlens is None:
        bounds = [(n * T, (n + 1) * T) for n in range(B)]
    else:
        bounds = list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True))

    outputs: list[torch.Tensor | None] = [None] * (B * T)
    finals = []
    for n, (start, end) in enumerate(bounds):
        if initial_state is None:
            position, weights = 0, list(params)
            carried = [torch.zeros_like(p) for p in params]
        else:
            position = int(state_position(initial_state)[n])
            weights = [t[n] for t in state_weights(initial_state)]
            carried = [t[n] for t in state_sums(initial_state)]
        pending: list[list[torch.Tensor]] = []
        for t in range(start, end):
            qt, kt, vt, lrt = (x[t] for x in flat)
            grads = _token_gradient(inner, kt, vt, weights, ln_weight, ln_bias, eps)
            pending.append([lrt.reshape(s) * g for s, g in zip(lr_shapes, grads, strict=True)])
            total = [c + sum(parts) for c, parts in zip(carried, zip(*pending, strict=True), strict=True)]
            position += 1
            weights_bar = [w - tau[position - 1] * s for w, s in zip(weights, total, strict=True)]
            outputs[t] = inner_output(qt, _f_res(inner, qt, weights_bar)[1][-1], ln_weight, ln_bias, eps)
            if position == b:
                position, weights, pending = 0, weights_bar, []
                carried = [torch.zeros_like(p) for p in weights]
        if pending:
            # the sequence ends mid-mini-batch: its last token's sums are the state's accumulators
            carried = total
        finals.append((position, weights, carried))

    o = torch.stack(outputs).reshape(B, T, H, d)
    if not output_final_state:
        return o, None
    position = torch.tensor([f[0] for f in finals], dtype=torch.long, device=q.device)
    stacked = [torch.stack([f[1][i] for f in finals]) for i in range(n_params)]
    stacked_sums = [torch.stack([f[2][i] for f in finals]) for i in range(n_params)]
    return o, pack_state(position, stacked, stacked_sums)
