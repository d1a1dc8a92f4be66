"""Causal softmax attention over a sliding window of each sequence's last tokens, continuing from a
cached window of keys and values that holds real tokens only (LaCT's attention branch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttt_mixer.ops.ttt.grid import MiniBatchGrid

# (keys [N, W - 1, H, e], values [N, W - 1, H, e], real [N, W - 1] bool, seen [N] int64): the last
# W - 1 real tokens of each sequence, right-aligned, and how many tokens each sequence has read
WindowState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def empty_window(
    num_sequences: int, window_size: int, num_heads: int, head_dim: int, like: torch.Tensor
) -> WindowState:
    width = window_size - 1
    zeros = like.new_zeros(num_sequences, width, num_heads, head_dim)
    real = torch.zeros(num_sequences, width, dtype=torch.bool, device=like.device)
    return zeros, zeros.clone(), real, torch.zeros(num_sequences, dtype=torch.long, device=like.device)


def token_positions(
    state: WindowState | None,
    batch_size: int,
    seq_len: int,
    cu_seqlens: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """[B, T] absolute position of every token in its own sequence, continued from the window's count."""
    grid = MiniBatchGrid(batch_size, seq_len, cu_seqlens, None, 1, device=device)
    steps = grid.to_grid(torch.ones(batch_size, seq_len, device=device)).squeeze(2).cumsum(1) - 1  # [N, L]
    seen = torch.zeros(grid.num_sequences, dtype=torch.long, device=device) if state is None else state[3]
    return grid.from_grid((steps.long() + seen[:, None])[:, :, None], batch_size, seq_len)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowState | None,
    window_size: int,
    cu_seqlens: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, WindowState]:
    """q, k, v [B, T, H, e] (or [1, T, ...] packed with ``cu_seqlens``) -> (o like q, the new window).

    Token t attends to itself and the W - 1 real tokens before it (its own call's and the window's),
    with scale 1/sqrt(e); computed in at least float32. ``valid`` [B, T] bool (rows only, no
    ``cu_seqlens``): each row's real tokens, a prefix of the row; the others are neither attended to
    nor kept, and their outputs are finite and meaningless."""
    if valid is not None and cu_seqlens is not None:
        raise ValueError("give valid (rows of real tokens) or cu_seqlens (packed sequences), not both")
    batch_size, seq_len, heads, head_dim = q.shape
    grid = MiniBatchGrid(batch_size, seq_len, cu_seqlens, None, 1, device=q.device)
    N = grid.num_sequences
    dtype = torch.promote_types(q.dtype, torch.float32)
    if state is None:
        state = empty_window(N, window_size, heads, head_dim, q.to(dtype))
    old_keys, old_values, old_real, seen = state
    rows_q, rows_k, rows_v = (grid.to_grid(t.to(dtype)).squeeze(2) for t in (q, k, v))  # [N, L, H, e]
    length = rows_q.shape[1]
    new_real = grid.to_grid(torch.ones(batch_size, seq_len, device=q.device)).squeeze(2) > 0
    if valid is not None:
        new_real = new_real & valid
    keys = torch.cat([old_keys.to(dtype), rows_k], dim=1)
    values = torch.cat([old_values.to(dtype), rows_v], dim=1)
    real = torch.cat([old_real, new_real], dim=1)
    # real tokens are contiguous (window right-aligned, new tokens left-aligned), so index distance is
    # token distance
    width = window_size - 1
    query_at = torch.arange(width, width + length, device=q.device)[:, None]
    key_at = torch.arange(width + length, device=q.device)[None, :]
    allowed = (key_at <= query_at) & (key_at > query_at - window_size) & real[:, None, :]
    allowed = allowed | (key_at == query_at)  # a padded query's row is never empty
    o = F.scaled_dot_product_attention(
        rows_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=allowed[:, None]
    ).transpose(1, 2)
    out = grid.from_grid(o.unsqueeze(2), batch_size, seq_len).to(q.dtype)
    counts = new_real.sum(1)
    index = counts[:, None] + torch.arange(width, device=q.device)[None, :]
    gather = index[:, :, None, None].expand(-1, -1, heads, head_dim)
    new_state = (
        keys.gather(1, gather),
        values.gather(1, gather),
        real.gather(1, index),
        seen + counts,
    )
    return out, new_state
