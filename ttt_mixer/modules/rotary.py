from __future__ import annotations

import torch


def apply_interleaved_rotary(
    x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0
) -> torch.Tensor:
    """RoPE on interleaved pairs (x[2i], x[2i+1]) with frequency theta^(-2i/d).

    x: [B, T, H, d]; positions: [B, T] integer. The authors' ``permute_qk`` -> half-split RoPE ->
    ``undo_permute_qk`` is exactly this rotation; the products are taken in their order so that the
    result matches theirs bit for bit.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=x.device).float() / d))
    angles = positions[..., None].float() * inv_freq  # [B, T, d/2]
    cos = angles.cos().to(x.dtype)[:, :, None, :]
    sin = angles.sin().to(x.dtype)[:, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([even * cos + (-odd) * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(-2)
