"""The inner model of TTT and the math the fast paths (chunked, decode step, Triton backward) share.

Notation follows docs/math.md: per head, keys/queries/values have head dim ``d``; the inner model is a
stack of linear layers ``Z_l = X_l W_l + b_l`` (one for TTT-Linear; two with a tanh-GELU between for
TTT-MLP) followed by ``z + LN(Z_last)``. Inside the chunked and decode paths each layer's weight and
bias travel together as one augmented matrix ``[W; b]`` of shape ``[d_in + 1, d_out]`` (inputs get a
trailing 1), which folds the bias update of the dual form into the weight update.

The closed forms these fast pieces are checked against (the LayerNorm-L2 gradient, the loss target
and gradient, gelu') are the reference's, in ``ttt_mixer.ops.ttt.naive``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

INNER_MODELS = ("linear", "mlp")
MLP_EXPANSION = 4
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


@dataclass(frozen=True)
class InnerModel:
    """Shape facts about an inner model: how many linear layers and their widths for head dim d."""

    name: str

    @property
    def num_layers(self) -> int:
        return 1 if self.name == "linear" else 2

    def layer_shapes(self, head_dim: int) -> list[tuple[int, int]]:
        if self.name == "linear":
            return [(head_dim, head_dim)]
        hidden = MLP_EXPANSION * head_dim
        return [(head_dim, hidden), (hidden, head_dim)]


def get_inner_model(name: str) -> InnerModel:
    if name not in INNER_MODELS:
        raise ValueError(f"inner_model must be one of {INNER_MODELS}, got {name!r}")
    return InnerModel(name)


def token_scale(token_offset: torch.Tensor) -> torch.Tensor:
    """tau_i = max(0, 1/i + eps_i) for i = 1..b (docs/math.md section 2)."""
    b = token_offset.shape[0]
    base = 1.0 / torch.arange(1, b + 1, device=token_offset.device, dtype=token_offset.dtype)
    return torch.clamp_min(base + token_offset, 0.0)


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
    """``reference_ln_fused_l2_grad`` (naive.py) for the chunked and decode paths: d/dz of
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
    k: torch.Tensor, v: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None
) -> torch.Tensor:
    """The part of the loss residual that does not depend on the weights: ln_bias - (XV - XK) when
    f(z) = z + LN(f_res(z)), -XV when f = f_res (the target as ``reference_loss_target`` gives it)."""
    target = v if ln_weight is None else v - k
    return -target if ln_bias is None else ln_bias - target


def fused_loss_grad(
    z: torch.Tensor, offset: torch.Tensor, ln_weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``reference_loss_grad`` from the ``loss_offset``: the fast form used inside the recurrences."""
    return z + offset if ln_weight is None else LayerNormL2Grad.apply(z, offset, ln_weight, eps)


def inner_gradients(
    inner: InnerModel,
    keys_aug: torch.Tensor,
    offset: torch.Tensor,
    weights: list[torch.Tensor],
    ln_weight: torch.Tensor | None,
    eps: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token gradients of the TTT loss at fixed weights.

    keys_aug: augmented keys [..., n, d + 1]; offset: see ``loss_offset``; weights: augmented
    [W_l; b_l] per layer, [..., d_in + 1, d_out].
    Returns (inputs, grads): the augmented input X'_l of each layer ([..., n, d_in + 1]) and
    dl/dZ_l ([..., n, d_out]), so that token j's weight gradient is X'_{l,j}^T grad_{l,j}.
    """
    z1 = keys_aug @ weights[0]
    if inner.num_layers == 1:
        return [keys_aug], [fused_loss_grad(z1, offset, ln_weight, eps)]
    hidden, hidden_grad = GeluTanhWithGrad.apply(z1)
    x2_aug = with_ones(hidden)
    grad2 = fused_loss_grad(x2_aug @ weights[1], offset, ln_weight, eps)
    grad1 = (grad2 @ weights[1][..., :-1, :].transpose(-1, -2)) * hidden_grad
    return [keys_aug, x2_aug], [grad1, grad2]


def inner_forward(inner: InnerModel, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """f_res(x; W) with augmented weights (no LayerNorm, no residual)."""
    z = with_ones(x) @ weights[0]
    if inner.num_layers == 2:
        z = with_ones(F.gelu(z, approximate="tanh")) @ weights[1]
    return z
