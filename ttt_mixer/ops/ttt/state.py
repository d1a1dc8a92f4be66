"""The recurrent state of a TTT layer: its tuple layout, accessors, and the state before any token.

A TTT state is a flat tuple, so that fla's Cache can reorder it for beam search:
  (position, W_1, b_1, [W_2, b_2,] S_W_1, S_b_1, [S_W_2, S_b_2])
position [N] int64: tokens already read in the current mini-batch (0..b-1); W_l [N, H, d_in, d_out]
and b_l [N, H, d_out]: weights at the start of the current mini-batch; S_*: the accumulated
learning-rate-weighted gradients of the mini-batch so far (docs/math.md section 5).

Code outside this module reads a state through the accessors (``state_position``, ``state_weights``,
``state_sums``, ``state_tensors``) and builds one with ``pack_state`` or ``initial_state``; the
chunked and decode paths use ``split_state`` / ``join_state``, which give each layer's weight and
bias as one augmented matrix [W; b] (see ``ttt_mixer.ops.ttt.inner``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttt_mixer.ops.ttt.inner import InnerModel

State = tuple[torch.Tensor, ...]


def state_length(inner: InnerModel) -> int:
    return 1 + 4 * inner.num_layers


def state_position(state: State) -> torch.Tensor:
    """[N] int64: the tokens each sequence has read of its current mini-batch."""
    return state[0]


def state_tensors(state: State) -> State:
    """The floating tensors: the weights, then the gradient sums."""
    return tuple(state[1:])


def state_weights(state: State) -> State:
    """(W_1, b_1[, W_2, b_2]): the weights at the start of the current mini-batch."""
    return tuple(state[1 : 1 + (len(state) - 1) // 2])


def state_sums(state: State) -> State:
    """(S_W_1, S_b_1[, S_W_2, S_b_2]): the accumulated gradients of the current mini-batch."""
    return tuple(state[1 + (len(state) - 1) // 2 :])


def pack_state(
    position: torch.Tensor, weights: Sequence[torch.Tensor], sums: Sequence[torch.Tensor]
) -> State:
    """The state tuple from its position, weights (W_1, b_1, ...) and gradient sums (S_W_1, S_b_1, ...)."""
    return (position, *weights, *sums)


def augmented_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[W_1, b_1, W_2, b_2, ...] ([.., d_in, d_out], [.., d_out]) -> augmented [.., d_in + 1, d_out]."""
    return [torch.cat([params[i], params[i + 1].unsqueeze(-2)], dim=-2) for i in range(0, len(params), 2)]


def split_state(state: State) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(position, augmented weights per layer, augmented gradient sums per layer)."""
    return state_position(state), augmented_params(state_weights(state)), augmented_params(state_sums(state))


def join_state(position: torch.Tensor, weights: list[torch.Tensor], sums: list[torch.Tensor]) -> State:
    """The state tuple from augmented weights and gradient sums (the inverse of ``split_state``)."""
    flat_weights = [t for w in weights for t in (w[..., :-1, :], w[..., -1, :])]
    flat_sums = [t for s in sums for t in (s[..., :-1, :], s[..., -1, :])]
    return pack_state(position, flat_weights, flat_sums)


def initial_state(inner: InnerModel, params: list[torch.Tensor], num_sequences: int) -> State:
    """The state before any token: the layer's own inner weights, empty accumulators, position 0."""
    position = torch.zeros(num_sequences, dtype=torch.long, device=params[0].device)
    weights = [w.unsqueeze(0).expand(num_sequences, *w.shape) for w in augmented_params(params)]
    return join_state(position, weights, [torch.zeros_like(w) for w in weights])
