"""The TTT family in one op (docs/math.md section 13): TTT-Linear and TTT-MLP, Titans' momentum and
data-dependent forgetting, LaCT's large chunks, SwiGLU fast weights, dot-product loss, weight
normalisation and Muon-orthogonalised updates, each member a ``FamilySpec``.

- ``reference``: ``ttt_family_reference``, token by token with autograd gradients, the ground truth;
- ``chunk``: ``ttt_family_chunk``, the chunked form in PyTorch; ``step``: ``ttt_family_step``, the
  decode step, and the one-token state transition the reference shares;
- ``spec``: the axes; ``inner``: inner models and update math; ``state``: the state tuple;
  ``checks``: input checks.
"""

from ttt_mixer.ops.ttt_family.chunk import ttt_family_chunk
from ttt_mixer.ops.ttt_family.reference import ttt_family_reference
from ttt_mixer.ops.ttt_family.spec import FAMILY_INNER_MODELS, INNER_LOSSES, UPDATE_ORDERS, FamilySpec
from ttt_mixer.ops.ttt_family.state import (
    family_state_gate_sums,
    family_state_length,
    family_state_momenta,
    family_state_position,
    family_state_updates,
    family_state_weights,
    initial_family_state,
    pack_family_state,
)
from ttt_mixer.ops.ttt_family.step import ttt_family_step

__all__ = [
    "FAMILY_INNER_MODELS",
    "INNER_LOSSES",
    "UPDATE_ORDERS",
    "FamilySpec",
    "family_state_gate_sums",
    "family_state_length",
    "family_state_momenta",
    "family_state_position",
    "family_state_updates",
    "family_state_weights",
    "initial_family_state",
    "pack_family_state",
    "ttt_family_chunk",
    "ttt_family_reference",
    "ttt_family_step",
]
