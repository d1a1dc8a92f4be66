"""The recurrent state of every TTT-family op: one flat tuple (so that fla's Cache can reorder it for
beam search), the same layout for TTT-Linear, TTT-MLP, Titans and LaCT:

    (position, *weights, *sums, [*momenta,] [gate_sums])

position [N] int64: tokens read of the current mini-batch (0..b-1); weights: the inner weights at the
start of the current mini-batch, in the layout of the op's ``params`` (``param_names``: W_1 [N, H,
d_in, d_out], b_1 [N, H, d_out], ... or SwiGLU's three matrices), where every gradient of the
mini-batch is taken; sums: the mini-batch's accumulated update so far, same shapes, which a token
reads as W - tau_i S (for TTT the learning-rate-weighted gradient sums S = sum_j lr_j G_j of
docs/math.md section 5; zero at a boundary); momenta: the momentum of the update (only with
``spec.momentum``); gate_sums [N, H, 2]: the sums of the momentum and forgetting gates over the
mini-batch's tokens so far (only in the apply-then-update order with momentum or forgetting, whose
means act at the mini-batch's end). docs/math.md section 13.

Code outside this module reads a state through the accessors and builds one with ``pack_state`` or
``initial_state``; the chunked and decode paths use ``state_matrices`` / ``pack_matrices``, which
give each linear layer's weight and bias as one augmented matrix [W; b] (``ttt_mixer.ops.ttt.inner``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttt_mixer.ops.ttt.inner import matrix_params, param_matrices, param_names
from ttt_mixer.ops.ttt.spec import FamilySpec

State = tuple[torch.Tensor, ...]
Matrices = list[torch.Tensor]


def state_length(spec: FamilySpec) -> int:
    n = len(param_names(spec))
    return 1 + n * (3 if spec.momentum else 2) + int(spec.has_gate_sums)


def state_position(state: State) -> torch.Tensor:
    """[N] int64: the tokens each sequence has read of its current mini-batch."""
    return state[0]


def state_tensors(state: State) -> State:
    """The floating tensors: the weights, the sums, then any momenta and gate sums."""
    return tuple(state[1:])


def state_weights(spec: FamilySpec, state: State) -> State:
    """The inner weights at the start of the current mini-batch, in the params' layout."""
    return tuple(state[1 : 1 + len(param_names(spec))])


def state_sums(spec: FamilySpec, state: State) -> State:
    """The current mini-batch's accumulated update so far, read as W - tau_i S."""
    n = len(param_names(spec))
    return tuple(state[1 + n : 1 + 2 * n])


def state_momenta(spec: FamilySpec, state: State) -> State | None:
    """The momenta of the update, or None without momentum."""
    n = len(param_names(spec))
    return tuple(state[1 + 2 * n : 1 + 3 * n]) if spec.momentum else None


def state_gate_sums(spec: FamilySpec, state: State) -> torch.Tensor | None:
    """[N, H, 2] sums of the momentum and forgetting gates of the mini-batch, or None."""
    return state[-1] if spec.has_gate_sums else None


def pack_state(
    position: torch.Tensor,
    weights: Sequence[torch.Tensor],
    sums: Sequence[torch.Tensor],
    momenta: Sequence[torch.Tensor] | None = None,
    gate_sums: torch.Tensor | None = None,
) -> State:
    """The state tuple from its parts, each in the params' layout."""
    return (position, *weights, *sums, *(momenta or ()), *(() if gate_sums is None else (gate_sums,)))


def state_matrices(
    spec: FamilySpec, state: State
) -> tuple[torch.Tensor, Matrices, Matrices, Matrices | None, torch.Tensor | None]:
    """(position, weights, sums, momenta or None, gate sums or None), the weights, sums and momenta as
    the matrices the ops carry (augmented [W; b] for linear and MLP layers)."""
    momenta = state_momenta(spec, state)
    return (
        state_position(state),
        param_matrices(spec, state_weights(spec, state)),
        param_matrices(spec, state_sums(spec, state)),
        None if momenta is None else param_matrices(spec, momenta),
        state_gate_sums(spec, state),
    )


def pack_matrices(
    spec: FamilySpec,
    position: torch.Tensor,
    weights: Matrices,
    sums: Matrices,
    momenta: Matrices | None,
    gate_sums: torch.Tensor | None,
) -> State:
    """The state tuple from matrices (the inverse of ``state_matrices``)."""
    return pack_state(
        position,
        matrix_params(spec, weights),
        matrix_params(spec, sums),
        None if momenta is None else matrix_params(spec, momenta),
        gate_sums,
    )


def initial_state(spec: FamilySpec, params: Sequence[torch.Tensor], num_sequences: int) -> State:
    """The state before any token: the initial weights for every sequence, nothing accumulated,
    position 0."""
    N = num_sequences
    weights = [p.unsqueeze(0).expand(N, *p.shape) for p in params]
    position = torch.zeros(N, dtype=torch.long, device=weights[0].device)
    momenta = [torch.zeros_like(w) for w in weights] if spec.momentum else None
    gate_sums = weights[0].new_zeros(N, weights[0].shape[1], 2) if spec.has_gate_sums else None
    return pack_state(position, weights, [torch.zeros_like(w) for w in weights], momenta, gate_sums)
