"""The update math of the TTT family beyond TTT's plain step (docs/math.md section 13), which the
chunked form, the decode step and the reference share: the end of a mini-batch in the
apply-then-update order (momentum and forgetting by the gates' means, Muon's Newton-Schulz
orthogonalisation, weight normalisation). Muon's orthogonalisation is odd (NS(-P) = -NS(P)), so it
acts on the step P = tau_b S that W loses as on the update -P.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttt_mixer.ops.ttt.spec import FamilySpec

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
    sums: list[torch.Tensor],
    momenta: list[torch.Tensor] | None,
    gate_sums: torch.Tensor | None,
    tau_last: torch.Tensor,
    target_norms: list[torch.Tensor] | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor | None]:
    """The end of a mini-batch in the apply-then-update order, on the rows where it ends (``done``: a
    boolean mask [..., 1, 1] against the matrices [..., d_in, d_out]): the step P = tau_b * S
    (S = sum_j lr_j G_j), then momentum M <- mean(eta) M + P, P = M; Muon P <- NS(P); forgetting
    W <- (1 - mean(alpha)) W - P (else W - P); weight normalisation. gate_sums [..., 2] hold sum(eta),
    sum(alpha) over the mini-batch's b tokens. Those rows start the next mini-batch with no sums and
    no gate sums. Returns (weights, sums, momenta, gate_sums)."""
    # Muon's normalisation has no gradient at a zero update: finish only where a mini-batch ends
    if not bool(done.any()):
        return weights, sums, momenta, gate_sums
    steps = [tau_last * s for s in sums]
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
        finished = [keep * w - u for w, u in zip(weights, steps, strict=True)]
    else:
        finished = [w - u for w, u in zip(weights, steps, strict=True)]
    if spec.weight_norm:
        finished = [
            w / (w.norm(dim=-2, keepdim=True) + WEIGHT_NORM_EPS) * target
            for w, target in zip(finished, target_norms, strict=True)
        ]
    weights = [torch.where(done, f, w) for f, w in zip(finished, weights, strict=True)]
    sums = [torch.where(done, 0.0, s) for s in sums]
    if gate_sums is not None:
        gate_sums = torch.where(done[..., 0], 0.0, gate_sums)
    return weights, sums, momenta, gate_sums
