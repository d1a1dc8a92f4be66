"""The one causal depthwise convolution of the project, continuing from a cached window: the TTT
layers' short convolutions (as the authors have them) and, through ``causal_depthwise_conv``, the
short convolutions of the fla mixers the adapters run in PyTorch."""

from __future__ import annotations

import torch
from torch import nn

from ttt_mixer.ops.ttt.grid import MiniBatchGrid


def causal_depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache: torch.Tensor | None,
    cache_width: int,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y_t = sum_i weight[:, i] x_{t - K + 1 + i} + bias, over x [B, T, D] (or [1, T, D] packed with
    ``cu_seqlens``) -> (y like x, the final cache or None). Computed in at least float32.

    weight: [D, 1, K] (nn.Conv1d's depthwise layout); cache: [N, D, cache_width], the last
    ``cache_width`` >= K - 1 inputs of each sequence, oldest first (None: zeros). The authors keep
    K - 1 inputs, fla's ShortConvolution K."""
    batch_size, seq_len, dim = x.shape
    kernel = weight.shape[-1]
    if cache_width < kernel - 1:
        raise ValueError(f"cache_width must be >= kernel size - 1 = {kernel - 1}, got {cache_width}")
    num_sequences = batch_size if cu_seqlens is None else cu_seqlens.numel() - 1
    if cache is None:
        cache = x.new_zeros(num_sequences, dim, cache_width)
    elif tuple(cache.shape) != (num_sequences, dim, cache_width):
        raise ValueError(f"conv_state must have shape [N, D, W] = {[num_sequences, dim, cache_width]}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    # sequences as rows [N, L, D]; the grid with mini-batch 1 unpacks cu_seqlens
    grid = MiniBatchGrid(batch_size, seq_len, cu_seqlens, None, 1, device=x.device)
    rows = grid.to_grid(x).squeeze(2)
    padded = torch.cat([cache.to(dtype), rows.transpose(1, 2).to(dtype)], dim=2)  # [N, D, W + L]
    # a K-wide depthwise window as K multiply-adds: far cheaper on CPU than conv1d's grouped path
    windows = padded[..., cache_width - (kernel - 1) :].unfold(2, kernel, 1)  # [N, D, L, K]
    y = (windows * weight[:, 0, None, :].to(dtype)).sum(-1)
    if bias is not None:
        y = y + bias[:, None].to(dtype)
    out = grid.from_grid(y.transpose(1, 2).unsqueeze(2), batch_size, seq_len).to(x.dtype)
    if not output_final_state:
        return out, None
    lengths = (
        torch.full((num_sequences,), seq_len, device=x.device) if cu_seqlens is None else cu_seqlens.diff()
    )
    index = lengths.to(x.device)[:, None] + torch.arange(cache_width, device=x.device)[None, :]
    return out, padded.gather(2, index[:, None, :].expand(-1, dim, -1)).to(cache.dtype)


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
        window = self.kernel_size[0] - 1
        return causal_depthwise_conv(x, self.weight, self.bias, cache, window, output_final_state, cu_seqlens)
