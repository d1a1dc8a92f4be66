"""Lay sequences out on a grid of whole mini-batches.

Every sequence's mini-batches are aligned to its own first token, continued from its own position
inside the current mini-batch (a state can stop mid-mini-batch). Sequence n with p_n tokens already
read in its mini-batch and length L_n occupies grid cells p_n .. p_n + L_n - 1 of row n; the other
cells are empty (zero inputs and zero learning rate, so they change neither outputs nor state).
Packed batches (``cu_seqlens``) and a batch of rows [B, T] are handled alike. Without packing and
without a start position (``None``: every sequence starts a fresh mini-batch) the layout follows from
the shapes alone, with no value read back from a tensor, so that ``torch.compile(fullgraph=True)``
and ``torch.export`` can trace it.
"""

from __future__ import annotations

import torch


class MiniBatchGrid:
    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        cu_seqlens: torch.Tensor | None,
        start_position: torch.Tensor | None,
        mini_batch_size: int,
        device: torch.device | None = None,
    ) -> None:
        """``start_position`` [N]: tokens each sequence has read of its current mini-batch (None: 0);
        ``device``: where the index tensors live when neither tensor argument says it."""
        for tensor in (start_position, cu_seqlens):
            device = tensor.device if tensor is not None else device
        b = mini_batch_size
        if cu_seqlens is None:
            starts = torch.arange(batch_size, device=device) * seq_len
            lengths = torch.full((batch_size,), seq_len, device=device)
        else:
            cu = cu_seqlens.to(device=device, dtype=torch.long)
            starts, lengths = cu[:-1], cu[1:] - cu[:-1]
        ends = lengths if start_position is None else start_position + lengths
        self.num_sequences = starts.shape[0]
        self.num_tokens = batch_size * seq_len
        static = cu_seqlens is None and start_position is None
        # every row of a fresh, unpacked batch ends at seq_len: the count needs no value read back
        longest = seq_len if static else int(ends.max())
        self.num_minibatches = -(-longest // b)
        self.mini_batch_size = b
        self.final_position = ends % b
        # mini-batch m of sequence n is complete when its last cell holds a real token
        m_end = (torch.arange(self.num_minibatches, device=device) + 1) * b
        self.complete = m_end[None, :] <= ends[:, None]
        # whether every mini-batch of every sequence is whole
        self.all_complete = seq_len % b == 0 if static else bool(self.complete.all())
        fresh = start_position is None or (cu_seqlens is None and not bool(start_position.any()))
        self.identity = cu_seqlens is None and fresh and seq_len % b == 0
        if self.identity:
            return
        if start_position is None:
            start_position = torch.zeros_like(starts)
        cells = torch.arange(self.num_minibatches * b, device=device)
        offset = cells[None, :] - start_position[:, None]
        real = (offset >= 0) & (offset < lengths[:, None])
        # empty cells read the extra zero row appended at index num_tokens
        self.gather_index = torch.where(real, starts[:, None] + offset, self.num_tokens)
        grid_flat = torch.arange(self.num_sequences, device=device)[:, None] * cells.numel() + cells[None, :]
        self.scatter_index = torch.empty(self.num_tokens, dtype=torch.long, device=device)
        self.scatter_index[self.gather_index[real]] = grid_flat[real]

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, M, b, ...] (M mini-batches of b cells)."""
        tail = x.shape[2:]
        if self.identity:
            return x.reshape(self.num_sequences, self.num_minibatches, self.mini_batch_size, *tail)
        flat = torch.cat([x.reshape(self.num_tokens, *tail), x.new_zeros(1, *tail)])
        return flat[self.gather_index].reshape(
            self.num_sequences, self.num_minibatches, self.mini_batch_size, *tail
        )

    def from_grid(self, y: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
        """[N, M, b, ...] -> [B, T, ...], keeping only the real tokens."""
        tail = y.shape[3:]
        if self.identity:
            return y.reshape(batch_size, seq_len, *tail)
        return y.reshape(-1, *tail)[self.scatter_index].reshape(batch_size, seq_len, *tail)


def minibatch_positions(
    batch_size: int,
    seq_len: int,
    cu_seqlens: torch.Tensor | None,
    start_position: torch.Tensor | None,
    mini_batch_size: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """[B, T] position of every token inside its own mini-batch, 0..b-1, counted from each sequence's
    first token and continued from its state's position (None: 0; the RoPE index of docs/math.md
    section 8)."""
    if start_position is None:
        start_position = torch.zeros(
            1 if cu_seqlens is None else cu_seqlens.numel() - 1, dtype=torch.long, device=device
        )
    device = start_position.device
    if cu_seqlens is None:
        offset = torch.arange(seq_len, device=device)[None, :] + start_position[:, None]
        return (offset % mini_batch_size).expand(batch_size, -1)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    token = torch.arange(seq_len, device=device)
    sequence = torch.searchsorted(cu[1:], token, right=True)
    return ((token - cu[sequence] + start_position[sequence]) % mini_batch_size)[None, :]
