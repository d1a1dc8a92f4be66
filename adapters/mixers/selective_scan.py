"""Exact PyTorch scans of the diagonal state-space recurrences behind the Mamba, Mamba-2 and Longhorn
mixers, with an initial state and the final state, so that a cached continuation of any length runs
in one call; and the depthwise causal convolution they share, with its window and padding.

``selective_scan`` (Mamba) and ``online_scan`` (Longhorn): S_t = a_t * S_{t-1} + (delta_t u_t) B_t^T
per channel, y_t = S_t C_t, where the decay a_t differs for every (channel, state) pair. A chunked
matrix form would need a [chunk, chunk] factor for every state entry, so the recurrence runs as one
fused multiply-add per token over time-major tensors, inside an autograd Function whose backward runs
it in reverse and reduces the gradients with matrix products. (Autograd through a loop over indexed
tensors, as transformers' Mamba scan runs, fills a full-size zero gradient for every token: quadratic
in the length.)

``ssd_scan`` (Mamba-2), whose decay is one number per head: the chunked state-space-dual form,
attention-like inside chunks, through the state across chunks. ``*_reference``: token by token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _scan_forward(decay: torch.Tensor, increment: torch.Tensor, initial: torch.Tensor | None) -> torch.Tensor:
    """S_t = decay_t * S_{t-1} + increment_t over dim 0, S_{-1} = initial (zero when None)."""
    states = torch.empty_like(increment)
    if initial is None:
        states[0] = increment[0]
    else:
        torch.addcmul(increment[0], decay[0], initial, out=states[0])
    for t in range(1, decay.shape[0]):
        torch.addcmul(increment[t], decay[t], states[t - 1], out=states[t])
    return states


class _DiagonalScan(torch.autograd.Function):
    """States S_t = a_t * S_{t-1} + (delta_t u_t) B_t^T per channel, outputs y_t = S_t C_t, over
    time-major tensors u, delta [T, B, D], B, C [T, B, N], initial [B, D, N] or None, with the decay

        exponential (Mamba):  a_t = exp(delta_t A),      A [D, N]
        else (Longhorn):      a_t = 1 - delta_t K_t^T,   K [T, B, N]

    Returns (y [T, B, D], final state [B, D, N]). The backward runs the recurrence in reverse and
    reduces the gradients with matrix products; it keeps the decays and states of the forward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        u: torch.Tensor,
        delta: torch.Tensor,
        decay_factor: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        initial: torch.Tensor | None,
        exponential: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # in the inputs' dtype: autocast would run the matrix products in half precision
        with torch.autocast(u.device.type, enabled=False):
            if exponential:
                decay = torch.mul(delta[..., None], decay_factor).exp_()
            else:
                decay = torch.mul(delta[..., None], decay_factor[:, :, None, :]).neg_().add_(1)
            increment = (delta * u)[..., None] * B[:, :, None, :]
            states = _scan_forward(decay, increment, initial)
            del increment
            y = torch.matmul(states, C[..., None])[..., 0]
        ctx.exponential = exponential
        ctx.device_type = u.device.type
        ctx.save_for_backward(u, delta, decay_factor, B, C, initial, decay, states)
        return y, states[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor | None, grad_final: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(ctx.device_type, enabled=False):
            return _DiagonalScan._backward(ctx, grad_y, grad_final)

    @staticmethod
    def _backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor | None, grad_final: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        u, delta, decay_factor, B, C, initial, decay, states = ctx.saved_tensors
        # G_t, the whole gradient reaching S_t: grad_y_t C_t^T + a_{t+1} G_{t+1}, the recurrence reversed
        if grad_y is None:
            grad = torch.zeros_like(states)
        else:
            # time-major like the states (it arrives as the transpose of a batch-first gradient)
            grad_y = grad_y.contiguous()
            grad = grad_y[..., None] * C[:, :, None, :]
        if grad_final is not None:
            grad[-1] += grad_final
        for t in range(states.shape[0] - 2, -1, -1):
            grad[t].addcmul_(decay[t + 1], grad[t + 1])
        # contractions as matrix products over the (t, b) batch, the big operand contiguous
        grad_delta_u = torch.matmul(grad, B[..., None])[..., 0]
        grad_B = torch.matmul((delta * u)[..., None, :], grad)[..., 0, :]
        grad_C = None if grad_y is None else torch.matmul(grad_y[..., None, :], states)[..., 0, :]
        grad_initial = None if initial is None else grad[0] * decay[0]
        # the gradient of the decay, G_t S_{t-1}, in place of G
        grad_decay = grad
        if initial is None:
            grad_decay[0] = 0
        else:
            grad_decay[0] *= initial
        grad_decay[1:] *= states[:-1]
        if ctx.exponential:
            # d a / d(delta A) = a
            grad_log_decay = grad_decay.mul_(decay)
            grad_delta = (grad_log_decay * decay_factor).sum(-1)
            grad_factor = (grad_log_decay * delta[..., None]).sum((0, 1))
        else:
            # d a / d delta = -K, d a / d K = -delta
            grad_delta = -torch.matmul(grad_decay, decay_factor[..., None])[..., 0]
            grad_factor = -torch.matmul(delta[..., None, :], grad_decay)[..., 0, :]
        grad_delta = grad_delta + grad_delta_u * u
        return grad_delta_u * delta, grad_delta, grad_factor, grad_B, grad_C, grad_initial, None


def _diagonal_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    decay_factor: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    exponential: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``_DiagonalScan`` on batch-first tensors, in at least float32 (float64 stays float64)."""
    dtype = _compute_dtype(u, delta, decay_factor, B, C)
    if initial_state is not None:
        expected = (u.shape[0], u.shape[2], B.shape[2])
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"initial_state must have shape {list(expected)}, got {list(initial_state.shape)}"
            )
        initial_state = initial_state.to(dtype).contiguous()
    u, delta, B, C = (x.to(dtype).transpose(0, 1).contiguous() for x in (u, delta, B, C))
    decay_factor = decay_factor.to(dtype)
    decay_factor = decay_factor.contiguous() if exponential else decay_factor.transpose(0, 1).contiguous()
    y, final_state = _DiagonalScan.apply(u, delta, decay_factor, B, C, initial_state, exponential)
    return y.transpose(0, 1), final_state if output_final_state else None


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the inputs promote to, at least float32: states accumulate in single precision or more."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba's selective scan: u, delta [B, T, D] (delta >= 0, the discretisation step after its
    softplus), A [D, N], B, C [B, T, N], initial_state [B, D, N] ->
    (y [B, T, D], final state [B, D, N] or None), with

        S_t = exp(delta_t A) * S_{t-1} + (delta_t u_t) B_t,    y_t = S_t C_t

    per channel d (S_t[d] in R^N). The skip D u and the gate are the caller's. Computed in at least
    float32 (float64 stays float64); a token with delta 0 leaves the state as it is."""
    return _diagonal_scan(u, delta, A, B, C, initial_state, output_final_state, exponential=True)


def online_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Longhorn's scan: u, delta [B, T, D], k, q [B, T, N], initial_state [B, D, N] ->
    (y [B, T, D], final state [B, D, N] or None), with

        S_t = (1 - delta_t k_t^2) * S_{t-1} + (delta_t u_t) k_t,    y_t = S_t q_t

    per channel d (k_t^2 elementwise). ``delta`` is the caller's (Longhorn's normalised step); the
    skip and the gate too. At least float32 (float64 stays float64); delta 0 keeps the state."""
    return _diagonal_scan(u, delta, k.square(), k, q, initial_state, output_final_state, exponential=False)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``selective_scan`` token by token (plain autograd): (y [B, T, D], final state [B, D, N])."""
    dtype = _compute_dtype(u, delta, A, B, C)
    u, delta, A, B, C = (x.to(dtype) for x in (u, delta, A, B, C))
    state = u.new_zeros(u.shape[0], *A.shape) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(u.shape[1]):
        decay = torch.exp(delta[:, t, :, None] * A)
        state = decay * state + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        outputs.append(torch.einsum("bdn,bn->bd", state, C[:, t]))
    return torch.stack(outputs, 1), state


def _segment_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L]: entry (t, s) = sum of log_decay over (s, t] for s <= t, -inf above the
    diagonal; summed directly rather than as a difference of cumulative sums, which would cancel."""
    length = log_decay.shape[-1]
    below = torch.ones(length, length, dtype=torch.bool, device=log_decay.device).tril(-1)
    # entry (r, s) of the expanded tensor: log_decay_r where r > s
    expanded = log_decay[..., :, None].expand(*log_decay.shape, length).masked_fill(~below, 0)
    sums = expanded.cumsum(-2)
    causal = torch.ones(length, length, dtype=torch.bool, device=log_decay.device).tril()
    return sums.masked_fill(~causal, float("-inf"))


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-2's scan: x [B, T, H, P], dt [B, T, H] (>= 0, after its softplus), A [H], B, C
    [B, T, G, N] (head h reads group h // (H / G)), initial_state [B, H, P, N] ->
    (y [B, T, H, P], final state [B, H, P, N] or None), with

        S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,    y_t = S_t C_t

    per head. Chunks of ``chunk_size`` tokens (fewer when the sequence is shorter): inside a chunk
    y = (causal decay-weighted C B^T) x, the chunk's attention-like form; across chunks the state.
    The skip D x and the gate are the caller's. At least float32 (float64 stays float64); a token
    with dt 0 leaves the state as it is."""
    batch_size, seq_len, num_heads, head_dim = x.shape
    groups, state_size = B.shape[-2:]
    if num_heads % groups:
        raise ValueError(f"the {num_heads} heads must split evenly into the {groups} groups of B and C")
    dtype = _compute_dtype(x, dt, A, B, C)
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    B, C = (t.to(dtype).repeat_interleave(num_heads // groups, dim=2) for t in (B, C))  # [B, T, H, N]
    length = min(chunk_size, seq_len)
    pad = -seq_len % length
    if pad:
        # padded tokens: dt 0 (decay 1, nothing written), so the final state is the last real token's
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    chunks = (seq_len + pad) // length
    x, B, C = (t.reshape(batch_size, chunks, length, num_heads, -1) for t in (x, B, C))
    dt = dt.reshape(batch_size, chunks, length, num_heads)
    log_decay = (dt * A).permute(0, 1, 3, 2)  # [B, c, H, L]
    cumulative = log_decay.cumsum(-1)

    # inside each chunk: y_t += sum_{s <= t} exp(sum_{(s, t]} dt A) (C_t . B_s) dt_s x_s
    weights = torch.exp(_segment_sums(log_decay))  # [B, c, H, L(t), L(s)]
    scores = torch.einsum("bclhn,bcshn->bchls", C, B) * weights * dt.permute(0, 1, 3, 2)[:, :, :, None, :]
    y = torch.einsum("bchls,bcshp->bclhp", scores, x)

    # each chunk's own contribution to the state at its end, and the decay across the whole chunk
    # sum of log_decay over (s, L - 1], summed from the end rather than as a difference
    after = F.pad(log_decay[..., 1:], (0, 1)).flip(-1).cumsum(-1).flip(-1)
    to_end = torch.exp(after) * dt.permute(0, 1, 3, 2)  # [B, c, H, L]
    written = torch.einsum("bchl,bclhp,bclhn->bchpn", to_end, x, B)
    chunk_decay = torch.exp(cumulative[..., -1])  # [B, c, H]

    # across chunks, in order: the state each chunk starts from
    state = (
        x.new_zeros(batch_size, num_heads, head_dim, state_size) if initial_state is None else initial_state
    )
    state = state.to(dtype)
    starts = []
    for c in range(chunks):
        starts.append(state)
        state = chunk_decay[:, c, :, None, None] * state + written[:, c]
    start_states = torch.stack(starts, 1)  # [B, c, H, P, N]
    # that state, decayed to each token of the chunk, read by C
    y = y + torch.einsum("bclhn,bchpn,bchl->bclhp", C, start_states, torch.exp(cumulative))
    y = y.reshape(batch_size, chunks * length, num_heads, head_dim)[:, :seq_len]
    return y, state if output_final_state else None


def ssd_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_scan`` token by token (plain autograd): (y [B, T, H, P], final state [B, H, P, N])."""
    num_heads, groups = x.shape[2], B.shape[2]
    dtype = _compute_dtype(x, dt, A, B, C)
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    B, C = (t.to(dtype).repeat_interleave(num_heads // groups, dim=2) for t in (B, C))
    if initial_state is None:
        state = x.new_zeros(x.shape[0], num_heads, x.shape[3], B.shape[-1])
    else:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(outputs, 1), state
