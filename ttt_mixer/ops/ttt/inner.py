"""The inner models of the TTT family and their hand-written gradients: the one place where an inner
model's forward and backward are written, for every form (reference, chunked, decode step) and spec.

Notation follows docs/math.md: per head, keys/queries/values have head dim ``d``. Each inner model is
a chain of weight matrices (section 13): TTT-Linear's one and TTT-MLP's two (a tanh-GELU between)
act on augmented rows ``[x, 1]``, each layer's weight and bias travelling together as one matrix
``[W; b]`` of shape ``[d_in + 1, d_out]``, which folds the bias update of the dual form into the
weight update; SwiGLU's three (gate, up, down) take no bias. With an inner LayerNorm the model is
``f(x) = x + LN(f_res(x))``. ``inner_apply`` is the one place where a chain is written, with the
product of a matrix left to its caller, so that the plain forward and the dual form run the same
structure; ``key_gradients`` is the one place where its gradients are.

The closed forms these fast pieces are checked against (the LayerNorm-L2 gradient, gelu') are in
``ttt_mixer.ops.ttt.reference``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ttt_mixer.ops.ttt.spec import FamilySpec

MLP_EXPANSION = 4
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def token_scale(token_offset: torch.Tensor) -> torch.Tensor:
    """tau_i = max(0, 1/i + eps_i) for i = 1..b (docs/math.md section 2)."""
    b = token_offset.shape[0]
    base = 1.0 / torch.arange(1, b + 1, device=token_offset.device, dtype=token_offset.dtype)
    return torch.clamp_min(base + token_offset, 0.0)


def token_scales(
    spec: FamilySpec, token_offset: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """tau_1..tau_b (``token_scale``), or ones without a token scale (Titans, LaCT)."""
    if token_offset is None:
        return torch.ones(spec.mini_batch_size, dtype=dtype, device=device)
    return token_scale(token_offset.to(dtype))


def layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head LayerNorm over the last dim; weight/bias broadcast as [H, 1, d] against [.., H, n, d]."""
    return F.layer_norm(z, z.shape[-1:], eps=eps) * weight + bias


def layer_norm_backward(grad: torch.Tensor, z_hat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """rstd * (grad - mean(grad) - z_hat * mean(grad * z_hat)): LayerNorm's backward without affine.

    Written out on the normalised z_hat: ATen's native backward expands it in the raw z and loses
    several digits to cancellation when the mean of a row is large against its spread."""
    centred = grad - grad.mean(dim=-1, keepdim=True)
    return torch.addcmul(centred, z_hat, (grad * z_hat).mean(dim=-1, keepdim=True), value=-1.0) * rstd


def inner_output(
    x: torch.Tensor, z: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """f(x) from f_res(x) = z: x + LN(z), or z alone without the LayerNorm and residual."""
    return z if ln_weight is None else x + layer_norm(z, ln_weight, ln_bias, eps)


class GeluTanhWithGrad(torch.autograd.Function):
    """(gelu(z), gelu'(z)) for approximate='tanh', with a hand-derived backward.

    TTT-MLP needs both at the same point of every mini-batch. The forward is ATen's (its gelu and
    gelu_backward kernels are the fastest here); the backward writes gelu'' out, several times
    cheaper on these small tensors than autograd's double backward of gelu_backward."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad = torch.ops.aten.gelu_backward(torch.ones_like(z), z, approximate="tanh")
        ctx.save_for_backward(z, grad)
        return F.gelu(z, approximate="tanh"), grad

    @staticmethod
    @once_differentiable
    def backward(ctx, d_gelu: torch.Tensor | None, d_grad: torch.Tensor | None) -> torch.Tensor:
        z, grad = ctx.saved_tensors
        d_z = torch.zeros_like(z) if d_gelu is None else d_gelu * grad
        if d_grad is not None:
            # with u = sqrt(2/pi) (z + c z^3) and t = tanh(u): gelu'' = (1 - t^2) (u' + z/2 (u'' - 2 t u'^2))
            z_sq = z * z
            u_grad = (1.0 + 3 * GELU_CUBIC * z_sq) * SQRT_2_OVER_PI
            t = torch.tanh(z * (1.0 + GELU_CUBIC * z_sq) * SQRT_2_OVER_PI)
            u_second = (6 * GELU_CUBIC * SQRT_2_OVER_PI) * z
            second = (1.0 - t * t) * (u_grad + 0.5 * z * (u_second - 2 * t * u_grad * u_grad))
            d_z = d_z + d_grad * second
        return d_z


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """Append a trailing 1 feature so that x' @ [W; b] = x @ W + b."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


class LayerNormL2Grad(torch.autograd.Function):
    """``reference_ln_fused_l2_grad`` (reference.py) for the chunked and decode paths: d/dz of
    1/2 ||LN(z) - target||^2, taking ``offset = ln_bias - target``, with a hand-derived backward.

    The inner loop differentiates this gradient once more when the layer trains; autograd through the
    closed form, or through LayerNorm's own double backward, costs three to four times as many
    operations on these small per-mini-batch tensors."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        z_hat, _, rstd = torch.native_layer_norm(z, z.shape[-1:], None, None, eps)
        grad_hat = torch.addcmul(offset, z_hat, weight) * weight
        grad = layer_norm_backward(grad_hat, z_hat, rstd)
        ctx.save_for_backward(rstd, z_hat, grad_hat, grad, weight, offset)
        return grad

    @staticmethod
    @once_differentiable
    def backward(ctx, d_grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rstd, z_hat, grad_hat, grad, weight, offset = ctx.saved_tensors
        # grad = rstd * P(grad_hat) with P the projection of layer_norm_backward, so
        # d grad_hat = rstd * P(d_grad); z_hat, grad_hat and rstd all depend on z
        d_grad_hat = layer_norm_backward(d_grad, z_hat, rstd)
        d_scaled = d_grad * rstd
        proj = (grad_hat * z_hat).mean(dim=-1, keepdim=True)
        d_proj = (d_scaled * z_hat).mean(dim=-1, keepdim=True)
        d_z_hat = d_grad_hat * weight.square() - d_scaled * proj - d_proj * grad_hat
        d_rstd_term = rstd * (d_grad * grad).mean(dim=-1, keepdim=True)
        d_z = layer_norm_backward(d_z_hat, z_hat, rstd) - d_rstd_term * z_hat
        d_offset = d_weight = None
        if ctx.needs_input_grad[1]:
            d_offset = (d_grad_hat * weight).sum_to_size(offset.shape)
        if ctx.needs_input_grad[2]:
            # grad_hat = (weight * z_hat + offset) * weight
            d_weight = (d_grad_hat * torch.addcmul(offset, z_hat, weight, value=2.0)).sum_to_size(
                weight.shape
            )
        return d_z, d_offset, d_weight, None


def loss_offset(
    spec: FamilySpec,
    k: torch.Tensor,
    v: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The part of the loss gradient that does not depend on the weights. Reconstruction: the residual
    offset ln_bias - (XV - XK) when f(z) = z + LN(f_res(z)), -XV when f = f_res (the target as
    ``reference_loss_target`` gives it); the dot product -<f_res(k), v>: its whole gradient -v."""
    if spec.loss == "dot_product":
        return -v
    target = v if ln_weight is None else v - k
    return -target if ln_bias is None else ln_bias - target


def output_gradient(
    spec: FamilySpec, z: torch.Tensor, offset: torch.Tensor, ln_weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """dl/dz of a token's loss at the last matrix's output z, from its ``loss_offset``: the closed
    forms of docs/math.md section 1 for the reconstruction loss, the offset itself for the dot product."""
    if spec.loss == "dot_product":
        return offset.expand_as(z)
    return z + offset if ln_weight is None else LayerNormL2Grad.apply(z, offset, ln_weight, eps)


def param_names(spec: FamilySpec) -> tuple[str, ...]:
    """The names of the initial inner weights, in the ops' order."""
    return {
        "linear": ("w1", "b1"),
        "mlp": ("w1", "b1", "w2", "b2"),
        "swiglu": ("w_gate", "w_up", "w_down"),
    }[spec.inner_model]


def param_shapes(spec: FamilySpec, num_heads: int, head_dim: int) -> list[tuple[int, ...]]:
    """Shapes of the initial inner weights: [H, d_in, d_out] matrices and [H, d_out] biases."""
    H, d = num_heads, head_dim
    if spec.inner_model == "linear":
        return [(H, d, d), (H, d)]
    if spec.inner_model == "mlp":
        hidden = MLP_EXPANSION * d
        return [(H, d, hidden), (H, hidden), (H, hidden, d), (H, d)]
    return [(H, d, d), (H, d, d), (H, d, d)]


def augmented_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[W_1, b_1, W_2, b_2, ...] ([.., d_in, d_out], [.., d_out]) -> augmented [.., d_in + 1, d_out]."""
    return [torch.cat([params[i], params[i + 1].unsqueeze(-2)], dim=-2) for i in range(0, len(params), 2)]


def param_matrices(spec: FamilySpec, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inner weights in the params' layout (``param_names``) as the matrices the ops carry: augmented
    [W; b] for linear and MLP layers."""
    return augmented_params(params) if spec.has_bias else list(params)


def matrix_params(spec: FamilySpec, matrices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of ``param_matrices``: each augmented [W; b] split into W and b."""
    if not spec.has_bias:
        return list(matrices)
    return [t for m in matrices for t in (m[..., :-1, :], m[..., -1, :])]


def first_input(spec: FamilySpec, x: torch.Tensor) -> torch.Tensor:
    """The first matrix's input for x: augmented [x, 1] for linear and MLP layers, x for SwiGLU."""
    return with_ones(x) if spec.has_bias else x


# which matrices read the inner model's input itself (their inputs depend on no weight)
FIRST_MATRICES = {"linear": (0,), "mlp": (0,), "swiglu": (0, 1)}


def inner_apply(
    spec: FamilySpec, x1: torch.Tensor, product: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """f_res from its first input x1 (``first_input``), with ``product(m, x_m)`` giving the m-th
    matrix's output for its input x_m."""
    if spec.inner_model == "linear":
        return product(0, x1)
    if spec.inner_model == "mlp":
        return product(1, with_ones(F.gelu(product(0, x1), approximate="tanh")))
    return product(2, F.silu(product(0, x1)) * product(1, x1))


def plain_product(weights: Sequence[torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    return lambda m, x: x @ weights[m]


def inner_forward(spec: FamilySpec, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """f_res(x; W) for x [..., n, d] and matrices [..., d_in, d_out] (no LayerNorm, no residual)."""
    return inner_apply(spec, first_input(spec, x), plain_product(weights))


def silu_grad(x: torch.Tensor) -> torch.Tensor:
    sigmoid = torch.sigmoid(x)
    return sigmoid * (1.0 + x * (1.0 - sigmoid))


def key_gradients(
    spec: FamilySpec,
    x1: torch.Tensor,
    offset: torch.Tensor,
    weights: Sequence[torch.Tensor],
    ln_weight: torch.Tensor | None,
    eps: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token loss gradients at fixed weights, from the keys' first input x1 (``first_input``)
    and ``loss_offset``: (inputs X_m [..., n, d_in], output gradients g_m [..., n, d_out]) of every
    matrix, so that token j's gradient of matrix m is X_mj^T g_mj."""
    if spec.inner_model == "linear":
        return [x1], [output_gradient(spec, x1 @ weights[0], offset, ln_weight, eps)]
    if spec.inner_model == "mlp":
        hidden, hidden_grad = GeluTanhWithGrad.apply(x1 @ weights[0])
        x2 = with_ones(hidden)
        g2 = output_gradient(spec, x2 @ weights[1], offset, ln_weight, eps)
        g1 = (g2 @ weights[1][..., :-1, :].transpose(-1, -2)) * hidden_grad
        return [x1, x2], [g1, g2]
    gate, up = x1 @ weights[0], x1 @ weights[1]
    activated = F.silu(gate)
    hidden = activated * up
    g_out = output_gradient(spec, hidden @ weights[2], offset, ln_weight, eps)
    g_hidden = g_out @ weights[2].transpose(-1, -2)
    return [x1, x1, hidden], [g_hidden * up * silu_grad(gate), g_hidden * activated, g_out]
