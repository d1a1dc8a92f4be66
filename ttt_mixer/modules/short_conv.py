from __future__ import annotations

import torch
from torch import nn

from ttt_mixer.ops.ttt.grid import MiniBatchGrid


class DepthwiseCausalConv(nn.Conv1d):
    """Depthwise causal convolution over time, with bias, that can continue from a cached window.

    Parameters have nn.Conv1d's layout (weight [D, 1, K], bias [D]), as in the authors' code and in
    fla's ShortConvolution. The state of a sequence is its last K - 1 inputs, [N, D, K - 1].
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = True) -> None:
        if kernel_size < 1:
            raise ValueError(f"conv kernel_size must be >= 1, got {kernel_size}")
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cache: torch.Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, T, D] (or [1, T, D] packed with cu_seqlens) -> ([B, T, D], state or None)."""
        B, T, D = x.shape
        window = self.kernel_size[0] - 1
        # sequences as rows [N, L, D]; the grid with mini-batch 1 unpacks cu_seqlens
        num_sequences = B if cu_seqlens is None else cu_seqlens.numel() - 1
        grid = MiniBatchGrid(
            B, T, cu_seqlens, torch.zeros(num_sequences, dtype=torch.long, device=x.device), 1
        )
        rows = grid.to_grid(x).squeeze(2)
        if cache is None:
            cache = x.new_zeros(num_sequences, D, window)
        elif tuple(cache.shape) != (num_sequences, D, window):
            raise ValueError(f"conv cache must have shape [N, D, K - 1] = {[num_sequences, D, window]}")
        padded = torch.cat([cache.to(x.dtype), rows.transpose(1, 2)], dim=2)  # [N, D, K - 1 + L]
        # a K-wide depthwise window as K multiply-adds: far cheaper on CPU than conv1d's grouped path
        y = (padded.unfold(2, window + 1, 1) * self.weight).sum(-1)
        if self.bias is not None:
            y = y + self.bias[:, None]
        y = y.transpose(1, 2)
        out = grid.from_grid(y.unsqueeze(2), B, T)
        if not output_final_state:
            return out, None
        lengths = (
            torch.full((num_sequences,), T, device=x.device) if cu_seqlens is None else cu_seqlens.diff()
        )
        index = lengths.to(x.device)[:, None] + torch.arange(window, device=x.device)[None, :]
        return out, padded.gather(2, index[:, None, :].expand(-1, D, -1))
