"""Pieces shared by every TTT path: the inner models, the closed-form gradients, the token scale,
the recurrent-state layout and input validation.

Notation follows SPEC.md: per head, keys/queries/values have head dim ``d``; the inner model is a
stack of linear layers ``Z_l = X_l W_l + b_l`` (one for TTT-Linear; two with a tanh-GELU between for
TTT-MLP) followed by ``z + LN(Z_last)``. Inside the chunked and decode paths each layer's weight and
bias travel together as one augmented matrix ``[W; b]`` of shape ``[d_in + 1, d_out]`` (inputs get a
trailing 1), which folds the bias update of the dual form into the weight update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

INNER_MODELS = ("linear", "mlp")
MLP_EXPANSION = 4
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


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
    """tau_i = max(0, 1/i + eps_i) for i = 1..b (SPEC.md section 2)."""
    b = token_offset.shape[0]
    base = 1.0 / torch.arange(1, b + 1, device=token_offset.device, dtype=token_offset.dtype)
    return torch.clamp_min(base + token_offset, 0.0)


def layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head LayerNorm over the last dim; weight/bias broadcast as [H, 1, d] against [.., H, n, d]."""
    return F.layer_norm(z, z.shape[-1:], eps=eps) * weight + bias


def _layer_norm_backward(grad: torch.Tensor, z_hat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """rstd * (grad - mean(grad) - z_hat * mean(grad * z_hat)): LayerNorm's backward without affine.

    Written out on the normalised z_hat: ATen's native backward expands it in the raw z and loses
    several digits to cancellation when the mean of a row is large against its spread."""
    centred = grad - grad.mean(dim=-1, keepdim=True)
    return torch.addcmul(centred, z_hat, (grad * z_hat).mean(dim=-1, keepdim=True), value=-1.0) * rstd


def ln_fused_l2_grad(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """d/dz of 1/2 ||LN(z) - target||^2, the LayerNorm backward fused with the L2 loss (closed form)."""
    centred = z - z.mean(dim=-1, keepdim=True)
    # the variance as a mean of squares: Tensor.var is several times slower on small rows
    rstd = torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    z_hat = centred * rstd
    grad_hat = (weight * z_hat + bias - target) * weight
    return _layer_norm_backward(grad_hat, z_hat, rstd)


def loss_target(k: torch.Tensor, v: torch.Tensor, ln_weight: torch.Tensor | None) -> torch.Tensor:
    """What f_res must reproduce: XV - XK when f(z) = z + LN(f_res(z)), XV when f = f_res."""
    return v if ln_weight is None else v - k


def loss_grad(
    z: torch.Tensor,
    target: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """dl/dZ of the last inner layer; ln_weight None means f = f_res (no LayerNorm, no residual)."""
    return z - target if ln_weight is None else ln_fused_l2_grad(z, target, ln_weight, ln_bias, eps)


def inner_output(
    x: torch.Tensor, z: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """f(x) from f_res(x) = z: x + LN(z), or z alone without the LayerNorm and residual."""
    return z if ln_weight is None else x + layer_norm(z, ln_weight, ln_bias, eps)


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """Derivative of gelu(x, approximate='tanh')."""
    tanh_u = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3))
    return 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u**2) * _SQRT_2_OVER_PI * (
        1.0 + 3 * _GELU_CUBIC * x**2
    )


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
            u_grad = (1.0 + 3 * _GELU_CUBIC * z_sq) * _SQRT_2_OVER_PI
            t = torch.tanh(z * (1.0 + _GELU_CUBIC * z_sq) * _SQRT_2_OVER_PI)
            u_second = (6 * _GELU_CUBIC * _SQRT_2_OVER_PI) * z
            second = (1.0 - t * t) * (u_grad + 0.5 * z * (u_second - 2 * t * u_grad * u_grad))
            d_z = d_z + d_grad * second
        return d_z


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """Append a trailing 1 feature so that x' @ [W; b] = x @ W + b."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


class LayerNormL2Grad(torch.autograd.Function):
    """``ln_fused_l2_grad`` for the chunked and decode paths: d/dz of 1/2 ||LN(z) - target||^2, taking
    ``offset = ln_bias - target``, with a hand-derived backward.

    The inner loop differentiates this gradient once more when the layer trains; autograd through the
    closed form, or through LayerNorm's own double backward, costs three to four times as many
    operations on these small per-mini-batch tensors."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        z_hat, _, rstd = torch.native_layer_norm(z, z.shape[-1:], None, None, eps)
        grad_hat = torch.addcmul(offset, z_hat, weight) * weight
        grad = _layer_norm_backward(grad_hat, z_hat, rstd)
        ctx.save_for_backward(rstd, z_hat, grad_hat, grad, weight, offset)
        return grad

    @staticmethod
    @once_differentiable
    def backward(ctx, d_grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rstd, z_hat, grad_hat, grad, weight, offset = ctx.saved_tensors
        # grad = rstd * P(grad_hat) with P the projection of _layer_norm_backward, so
        # d grad_hat = rstd * P(d_grad); z_hat, grad_hat and rstd all depend on z
        d_grad_hat = _layer_norm_backward(d_grad, z_hat, rstd)
        d_scaled = d_grad * rstd
        proj = (grad_hat * z_hat).mean(dim=-1, keepdim=True)
        d_proj = (d_scaled * z_hat).mean(dim=-1, keepdim=True)
        d_z_hat = d_grad_hat * weight.square() - d_scaled * proj - d_proj * grad_hat
        d_rstd_term = rstd * (d_grad * grad).mean(dim=-1, keepdim=True)
        d_z = _layer_norm_backward(d_z_hat, z_hat, rstd) - d_rstd_term * z_hat
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
    f(z) = z + LN(f_res(z)), -XV when f = f_res (see ``loss_target``)."""
    target = loss_target(k, v, ln_weight)
    return -target if ln_bias is None else ln_bias - target


def fused_loss_grad(
    z: torch.Tensor, offset: torch.Tensor, ln_weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``loss_grad`` from the ``loss_offset``: the fast form used inside the recurrences."""
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


# Recurrent state ---------------------------------------------------------------------------------
#
# A TTT state is a flat tuple, so that fla's Cache can reorder it for beam search:
#   (position, W_1, b_1, [W_2, b_2,] S_W_1, S_b_1, [S_W_2, S_b_2])
# position [N] int64: tokens already read in the current mini-batch (0..b-1); W_l [N, H, d_in, d_out]
# and b_l [N, H, d_out]: weights at the start of the current mini-batch; S_*: the accumulated
# learning-rate-weighted gradients of the mini-batch so far (SPEC.md section 5).


def state_length(inner: InnerModel) -> int:
    return 1 + 4 * inner.num_layers


def split_state(
    inner: InnerModel, state: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(position, augmented weights per layer, augmented accumulators per layer)."""
    n = inner.num_layers
    position, params, accumulators = state[0], state[1 : 1 + 2 * n], state[1 + 2 * n :]
    weights = [torch.cat([params[2 * i], params[2 * i + 1].unsqueeze(-2)], dim=-2) for i in range(n)]
    sums = [torch.cat([accumulators[2 * i], accumulators[2 * i + 1].unsqueeze(-2)], dim=-2) for i in range(n)]
    return position, weights, sums


def join_state(
    position: torch.Tensor, weights: list[torch.Tensor], sums: list[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    flat = [t for w in weights for t in (w[..., :-1, :], w[..., -1, :])]
    flat += [t for s in sums for t in (s[..., :-1, :], s[..., -1, :])]
    return (position, *flat)


def augmented_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """[W_1, b_1, W_2, b_2, ...] ([H, d_in, d_out], [H, d_out]) -> augmented [H, d_in + 1, d_out]."""
    return [torch.cat([params[i], params[i + 1].unsqueeze(-2)], dim=-2) for i in range(0, len(params), 2)]


def initial_state(
    inner: InnerModel, params: list[torch.Tensor], num_sequences: int
) -> tuple[torch.Tensor, ...]:
    """The state before any token: the layer's own inner weights, empty accumulators, position 0."""
    position = torch.zeros(num_sequences, dtype=torch.long, device=params[0].device)
    weights = [w.unsqueeze(0).expand(num_sequences, *w.shape) for w in augmented_params(params)]
    return join_state(position, weights, [torch.zeros_like(w) for w in weights])


# Validation --------------------------------------------------------------------------------------


def _check_float(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but q has {dtype}: inputs and weights must share a dtype"
        )


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], form: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {form} = {list(shape)}, got {list(t.shape)}")


def validate_inputs(
    inner: InnerModel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_offset: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    params: list[torch.Tensor],
    initial_state: tuple[torch.Tensor, ...] | None,
    cu_seqlens: torch.Tensor | None,
) -> int:
    """Check every input of a TTT op before any work; returns the number of sequences N."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have rank 4 [B, T, H, d], got shape {list(q.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    B, T, H, d = q.shape
    if T == 0 or B == 0:
        raise ValueError(f"q must hold at least one token, got shape {list(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        _check_float(name, t, q.dtype)
        _check_shape(name, t, (B, T, H, d), "[B, T, H, d]")
    _check_float("lr", lr, q.dtype)
    _check_shape("lr", lr, (B, T, H), "[B, T, H]")
    _check_float("token_offset", token_offset, q.dtype)
    if token_offset.dim() != 1 or token_offset.shape[0] < 1:
        raise ValueError(
            f"token_offset must have shape [mini_batch_size >= 1], got {list(token_offset.shape)}"
        )
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must both be tensors, or both None (f = f_res)")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            _check_float(name, t, q.dtype)
            _check_shape(name, t, (H, d), "[H, d]")
    if len(params) != 2 * inner.num_layers:
        raise ValueError(
            f"params: TTT-{inner.name} takes {2 * inner.num_layers} inner weights (w1, b1[, w2, b2]), got {len(params)}"
        )
    for i, (d_in, d_out) in enumerate(inner.layer_shapes(d)):
        _check_float(f"w{i + 1}", params[2 * i], q.dtype)
        _check_shape(f"w{i + 1}", params[2 * i], (H, d_in, d_out), "[H, d_in, d_out]")
        _check_float(f"b{i + 1}", params[2 * i + 1], q.dtype)
        _check_shape(f"b{i + 1}", params[2 * i + 1], (H, d_out), "[H, d_out]")
    if cu_seqlens is not None:
        if (
            not isinstance(cu_seqlens, torch.Tensor)
            or cu_seqlens.is_floating_point()
            or cu_seqlens.dim() != 1
        ):
            raise TypeError("cu_seqlens must be a 1-D integer tensor [N + 1]")
        if B != 1:
            raise ValueError(f"with cu_seqlens, q must have batch size 1 (packed), got {B}")
        if cu_seqlens.numel() < 2 or cu_seqlens[0] != 0 or cu_seqlens[-1] != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}, got {cu_seqlens.tolist()}")
        if (cu_seqlens[1:] < cu_seqlens[:-1]).any():
            raise ValueError("cu_seqlens must be non-decreasing")
        num_sequences = cu_seqlens.numel() - 1
    else:
        num_sequences = B
    if initial_state is not None:
        validate_state(inner, initial_state, num_sequences, H, d, token_offset.shape[0], name="initial_state")
    return num_sequences


def validate_state(
    inner: InnerModel,
    state: tuple[torch.Tensor, ...],
    num_sequences: int,
    num_heads: int,
    head_dim: int,
    mini_batch_size: int,
    name: str = "state",
) -> None:
    if not isinstance(state, (tuple, list)) or len(state) != state_length(inner):
        got = len(state) if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(
            f"{name} does not belong to a TTT-{inner.name} layer: expected a tuple of {state_length(inner)} "
            f"tensors (position, weights, accumulators), got {got}"
        )
    position = state[0]
    if position.dim() != 1 or position.is_floating_point():
        raise TypeError(f"{name}[0] (position) must be a 1-D integer tensor [N]")
    if position.shape[0] != num_sequences:
        raise ValueError(f"{name} holds {position.shape[0]} sequences but the input has {num_sequences}")
    if ((position < 0) | (position >= mini_batch_size)).any():
        raise ValueError(f"{name} positions must lie in [0, mini_batch_size = {mini_batch_size})")
    shapes = []
    for d_in, d_out in inner.layer_shapes(head_dim):
        shapes += [(d_in, d_out), (d_out,)]
    for t, shape in zip(state[1:], shapes + shapes, strict=True):
        expected = (num_sequences, num_heads, *shape)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} tensor has shape {list(t.shape)}, expected {list(expected)} "
                f"(batch size and layer type of the state must match the input)"
            )
