"""The inner models of the TTT family and the update math its three forms share.

Each inner model is a chain of weight matrices (docs/math.md section 13): TTT-Linear's one and
TTT-MLP's two act on augmented rows ``[x, 1]`` (the bias is the matrix's last row, as in
``ttt_mixer.ops.ttt.inner``); SwiGLU's three (gate, up, down) take no bias. ``inner_apply`` is the one
place where a chain is written, with the product of a matrix left to its caller, so that the plain
forward, the dual form and the reference all run the same structure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ttt_mixer.ops.ttt.inner import (
    MLP_EXPANSION,
    GeluTanhWithGrad,
    fused_loss_grad,
    loss_offset,
    with_ones,
)
from ttt_mixer.ops.ttt.state import augmented_params
from ttt_mixer.ops.ttt_family.spec import FamilySpec

# the per-step coefficients (a, b, c) of X <- a X + (b A + c A^2) X, A = X X^T: the quintic
# Newton-Schulz iteration of Muon (Jordan et al. 2024) as LaCT runs it, five steps
NEWTON_SCHULZ_STEPS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
# epsilons of LaCT's weight normalisation and of the Newton-Schulz input scaling
WEIGHT_NORM_EPS = 1e-5
NEWTON_SCHULZ_EPS = 1e-7


def param_names(spec: FamilySpec) -> tuple[str, ...]:
    """The names of the layer's initial inner weights, in the ops' order."""
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


def param_matrices(spec: FamilySpec, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The initial weights as the matrices the ops carry: augmented [W; b] for linear and MLP layers."""
    return list(params) if spec.inner_model == "swiglu" else augmented_params(params)


def inner_apply(
    spec: FamilySpec, x: torch.Tensor, product: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """f_res(x), with ``product(m, x_m)`` giving the m-th matrix's output for its input x_m."""
    if spec.inner_model == "linear":
        return product(0, with_ones(x))
    if spec.inner_model == "mlp":
        return product(1, with_ones(F.gelu(product(0, with_ones(x)), approximate="tanh")))
    return product(2, F.silu(product(0, x)) * product(1, x))


def plain_product(weights: Sequence[torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    return lambda m, x: x @ weights[m]


def inner_forward(spec: FamilySpec, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """f_res(x; W) for x [..., n, d] and matrices [..., d_in, d_out]."""
    return inner_apply(spec, x, plain_product(weights))


def output_gradient(
    spec: FamilySpec,
    z: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """dl/dz of a token's loss at the last matrix's output z: the closed forms of docs/math.md
    section 1 for the reconstruction loss, -v for the dot product -<f_res(k), v>."""
    if spec.loss == "dot_product":
        return -v.expand_as(z)
    return fused_loss_grad(z, loss_offset(k, v, ln_weight, ln_bias), ln_weight, eps)


def silu_grad(x: torch.Tensor) -> torch.Tensor:
    sigmoid = torch.sigmoid(x)
    return sigmoid * (1.0 + x * (1.0 - sigmoid))


def key_gradients(
    spec: FamilySpec,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: Sequence[torch.Tensor],
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token loss gradients at fixed weights: (inputs X_m [..., n, d_in], output gradients g_m
    [..., n, d_out]) of every matrix, so that token j's gradient of matrix m is X_mj^T g_mj."""
    if spec.inner_model == "linear":
        x = with_ones(k)
        return [x], [output_gradient(spec, x @ weights[0], k, v, ln_weight, ln_bias, eps)]
    if spec.inner_model == "mlp":
        x1 = with_ones(k)
        hidden, hidden_grad = GeluTanhWithGrad.apply(x1 @ weights[0])
        x2 = with_ones(hidden)
        g2 = output_gradient(spec, x2 @ weights[1], k, v, ln_weight, ln_bias, eps)
        g1 = (g2 @ weights[1][..., :-1, :].transpose(-1, -2)) * hidden_grad
        return [x1, x2], [g1, g2]
    gate, up = k @ weights[0], k @ weights[1]
    activated = F.silu(gate)
    hidden = activated * up
    g_out = output_gradient(spec, hidden @ weights[2], k, v, ln_weight, ln_bias, eps)
    g_hidden = g_out @ weights[2].transpose(-1, -2)
    return [k, k, hidden], [g_hidden * up * silu_grad(gate), g_hidden * activated, g_out]


def newton_schulz(update: torch.Tensor) -> torch.Tensor:
    """Muon's orthogonalisation of matrices [..., r, c]: the update scaled to Frobenius norm 1, then
    five quintic Newton-Schulz steps on its side with fewer rows."""
    wide = update.shape[-2] > update.shape[-1]
    x = update.transpose(-1, -2) if wide else update
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NEWTON_SCHULZ_EPS)
    for a, b, c in NEWTON_SCHULZ_STEPS:
        gram = x @ x.transpose(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-1, -2) if wide else x


def column_norms(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The norm of every column (over the input axis) of each matrix: weight normalisation's targets."""
    return [w.norm(dim=-2, keepdim=True) for w in weights]


def finish_minibatch(
    spec: FamilySpec,
    done: torch.Tensor,
    weights: list[torch.Tensor],
    updates: list[torch.Tensor],
    momenta: list[torch.Tensor] | None,
    gate_sums: torch.Tensor | None,
    tau_last: torch.Tensor,
    target_norms: list[torch.Tensor] | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor | None]:
    """The end of a mini-batch in the apply-then-update order, on the rows where it ends (``done``: a
    boolean mask [..., 1, 1] against the matrices [..., d_in, d_out]): the update U = tau_b * D
    (D = -sum_j lr_j G_j), then momentum S <- mean(eta) S + U, U = S; Muon U <- NS(U); forgetting
    W <- (1 - mean(alpha)) W + U (else W + U); weight normalisation. gate_sums [..., 2] hold sum(eta),
    sum(alpha) over the mini-batch's b tokens. Those rows start the next mini-batch with no update and
    no gate sums. Returns (weights, updates, momenta, gate_sums)."""
    # Muon's normalisation has no gradient at a zero update: finish only where a mini-batch ends
    if not bool(done.any()):
        return weights, updates, momenta, gate_sums
    steps = [tau_last * u for u in updates]
    b = spec.mini_batch_size
    if spec.momentum:
        mean_eta = (gate_sums[..., 0] / b)[..., None, None]
        new_momenta = [mean_eta * s + u for s, u in zip(momenta, steps, strict=True)]
        momenta = [torch.where(done, f, s) for f, s in zip(new_momenta, momenta, strict=True)]
        steps = new_momenta
    if spec.muon:
        steps = [newton_schulz(u) for u in steps]
    if spec.forgetting:
        keep = (1.0 - gate_sums[..., 1] / b)[..., None, None]
        finished = [keep * w + u for w, u in zip(weights, steps, strict=True)]
    else:
        finished = [w + u for w, u in zip(weights, steps, strict=True)]
    if spec.weight_norm:
        finished = [
            w / (w.norm(dim=-2, keepdim=True) + WEIGHT_NORM_EPS) * target
            for w, target in zip(finished, target_norms, strict=True)
        ]
    weights = [torch.where(done, f, w) for f, w in zip(finished, weights, strict=True)]
    updates = [torch.where(done, 0.0, u) for u in updates]
    if gate_sums is not None:
        gate_sums = torch.where(done[..., 0], 0.0, gate_sums)
    return weights, updates, momenta, gate_sums
