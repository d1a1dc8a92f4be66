"""The recurrent state of a TTT-family op: a flat tuple (so that fla's Cache can reorder it):

    (position, W_1..W_n, D_1..D_n, [S_1..S_n,] [gate_sums])

position [N] int64: tokens read of the current mini-batch (0..b-1); W_m [N, H, d_in, d_out]: matrix m
at the start of the mini-batch (augmented [W; b] for linear and MLP layers), where every gradient of
the mini-batch is taken; D_m: the mini-batch's update so far, before the token scale (zero at a
boundary); S_m: the momentum (only with ``spec.momentum``); gate_sums [N, H, 2]: sum of the momentum
and forgetting gates over the mini-batch's tokens so far (only in the apply-then-update order with
momentum or forgetting, whose means act at the mini-batch's end). docs/math.md section 13.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttt_mixer.ops.ttt_family.spec import FamilySpec

State = tuple[torch.Tensor, ...]


def family_state_length(spec: FamilySpec) -> int:
    n = spec.num_matrices
    return 1 + n * (3 if spec.momentum else 2) + int(spec.has_gate_sums)


def family_state_position(state: State) -> torch.Tensor:
    return state[0]


def family_state_weights(spec: FamilySpec, state: State) -> list[torch.Tensor]:
    """W_m: the matrices at the start of the current mini-batch."""
    return list(state[1 : 1 + spec.num_matrices])


def family_state_updates(spec: FamilySpec, state: State) -> list[torch.Tensor]:
    """D_m: the current mini-batch's update so far (before the token scale)."""
    n = spec.num_matrices
    return list(state[1 + n : 1 + 2 * n])


def family_state_momenta(spec: FamilySpec, state: State) -> list[torch.Tensor] | None:
    """S_m, or None without momentum."""
    n = spec.num_matrices
    return list(state[1 + 2 * n : 1 + 3 * n]) if spec.momentum else None


def family_state_gate_sums(spec: FamilySpec, state: State) -> torch.Tensor | None:
    """[N, H, 2] sums of the momentum and forgetting gates of the mini-batch, or None."""
    return state[-1] if spec.has_gate_sums else None


def unpack_family_state(
    spec: FamilySpec, state: State
) -> tuple[
    torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor | None
]:
    """The parts of a state, the inverse of ``pack_family_state``: (position, W, D, S or None, gate
    sums or None)."""
    return (
        family_state_position(state),
        family_state_weights(spec, state),
        family_state_updates(spec, state),
        family_state_momenta(spec, state),
        family_state_gate_sums(spec, state),
    )


def pack_family_state(
    position: torch.Tensor,
    weights: Sequence[torch.Tensor],
    updates: Sequence[torch.Tensor],
    momenta: Sequence[torch.Tensor] | None,
    gate_sums: torch.Tensor | None,
) -> State:
    return (
        position,
        *weights,
        *updates,
        *(momenta or ()),
        *(() if gate_sums is None else (gate_sums,)),
    )


def initial_family_state(spec: FamilySpec, matrices: Sequence[torch.Tensor], num_sequences: int) -> State:
    """The state before any token: the initial matrices [H, d_in, d_out] for every sequence, nothing
    accumulated, position 0."""
    N = num_sequences
    weights = [m.unsqueeze(0).expand(N, *m.shape) for m in matrices]
    zeros = [torch.zeros_like(w) for w in weights]
    gate_sums = None
    if spec.has_gate_sums:
        gate_sums = weights[0].new_zeros(N, weights[0].shape[1], 2)
    position = torch.zeros(N, dtype=torch.long, device=weights[0].device)
    momenta = [torch.zeros_like(w) for w in weights] if spec.momentum else None
    return pack_family_state(position, weights, zeros, momenta, gate_sums)
