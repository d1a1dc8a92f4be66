"""The gated delta rule in chunks, in PyTorch: what fla's ``naive_recurrent_gated_delta_rule``
computes, with a few matrix products and one triangular solve per chunk instead of a Python step
per token (fla's ``naive_chunk_gated_delta_rule`` solves its triangular system row by row).

Per head, with the state S [K, V], the step is S_t = exp(g_t) S_{t-1} + k_t u_t^T, where
u_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k_t), and o_t = scale * S_t^T q_t. Within a chunk starting
from S, with G_t the running sum of g from the chunk's start and D_ts = exp(G_t - G_s) for s <= t:

    (I + A) U = diag(beta) (V - diag(exp G) K S),   A_ts = beta_t D_ts (k_t . k_s) for s < t, else 0
    O = scale * (diag(exp G) Q S + (D * Q K^T) U)    (D * ...: lower triangle, diagonal included)
    S_next = exp(G_C) S + K^T diag(exp(G_C - G)) U

(the WY form of Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule"). Every
exponent is <= 0 where it is used, so nothing overflows; autograd differentiates the solve.
"""

from __future__ import annotations

import torch

# tokens per chunk: the products inside a chunk cost chunk_size per token, the loop one step per chunk
CHUNK_SIZE = 64


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``naive_recurrent_gated_delta_rule`` (same arguments and results), chunked.

    q, k [B, T, H, K]; v [B, T, H, V]; beta, g [B, T, H] (g: log-decay, <= 0); initial_state
    [B, H, K, V]. Returns o [B, T, H, V] in v's dtype and, with ``output_final_state``, the final
    state [B, H, K, V]; computed in at least float32, as fla's function."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.promote_types(v.dtype, torch.float32)
    q, k, v, beta, g = (x.transpose(1, 2).to(dtype) for x in (q, k, v, beta, g))
    batch, heads, length, key_dim = k.shape
    scale = key_dim**-0.5 if scale is None else scale
    state = (
        k.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    )
    outputs = []
    for start in range(0, length, chunk_size):
        chunk = slice(start, start + chunk_size)
        o, state = _chunk_step(
            q[:, :, chunk] * scale, k[:, :, chunk], v[:, :, chunk], beta[:, :, chunk], g[:, :, chunk], state
        )
        outputs.append(o)
    o = torch.cat(outputs, dim=2) if outputs else v.new_zeros(v.shape)
    return o.transpose(1, 2).to(v.dtype), state if output_final_state else None


def _chunk_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk (q already scaled), [B, H, C, *]: its outputs and the state after it."""
    size = k.shape[2]
    G = g.cumsum(-1)
    lower = torch.ones(size, size, dtype=torch.bool, device=k.device).tril()
    # exp(G_t - G_s) on and below the diagonal, 0 above (masked before exp: those exponents are > 0)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    strictly_lower = decay.tril(-1) * (k @ k.transpose(-1, -2)) * beta[..., :, None]
    eye = torch.eye(size, dtype=k.dtype, device=k.device)
    decay_from_start = G.exp()[..., None]  # what the chunk's initial state has decayed by at t
    rhs = beta[..., None] * (v - decay_from_start * (k @ state))
    u = torch.linalg.solve_triangular(eye + strictly_lower, rhs, upper=False, unitriangular=True)
    o = decay_from_start * (q @ state) + (decay * (q @ k.transpose(-1, -2))) @ u
    last = G[..., -1:]
    state = last.exp()[..., None] * state + k.transpose(-1, -2) @ ((last - G).exp()[..., None] * u)
    return o, state
