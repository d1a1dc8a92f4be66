"""The TTT family (docs/math.md sections 3-6 and 13): TTT-Linear and TTT-MLP, Titans' momentum and
data-dependent forgetting, LaCT's large chunks, SwiGLU fast weights, dot-product loss, weight
normalisation and Muon-orthogonalised updates, each member a ``FamilySpec``, all computed by one set
of ops, laid out by algorithm as fla lays out its ops:

- ``reference``: ``ttt_family_reference``, token by token with autograd gradients, the ground truth
  (``ttt_primal``: TTT-Linear / TTT-MLP in TTT's arguments), and the closed forms the fast pieces
  are held to;
- ``chunk``: ``ttt_family_chunk``, the chunked form in PyTorch (``ttt_chunk``); ``step``:
  ``ttt_family_step``, the decode step (``ttt_step``), and the one-token state transition the
  reference shares;
- ``triton``: ``ttt_chunk_triton`` and ``ttt_step_triton``, the fast path for TTT-Linear and TTT-MLP,
  on the forward kernel of ``triton_forward`` (its per-mini-batch recurrences in ``triton_linear`` and
  ``triton_mlp``), the fused backward kernels of ``triton_linear_backward`` and ``triton_mlp_backward``
  (its hidden tiles' in ``triton_mlp_tile_backward``, what both share in ``triton_backward``), and
  the pieces every kernel shares in ``triton_helpers``;
- ``dispatch``: ``family_ops``, the one choice between PyTorch and Triton for a spec;
- ``spec``: the axes; ``inner``: the inner models, their forward and hand-written gradients;
  ``update``: the family's update math beyond TTT's step; ``state``: the one state layout;
  ``checks``: the input checks of every op; ``grid``: sequences laid out in whole mini-batches.
"""

from ttt_mixer.ops.ttt.chunk import ttt_chunk, ttt_family_chunk
from ttt_mixer.ops.ttt.dispatch import BACKENDS, family_ops
from ttt_mixer.ops.ttt.inner import param_names, param_shapes, token_scale
from ttt_mixer.ops.ttt.reference import ttt_family_reference, ttt_primal
from ttt_mixer.ops.ttt.spec import (
    FAMILY_INNER_MODELS,
    INNER_LOSSES,
    INNER_MODELS,
    UPDATE_ORDERS,
    FamilySpec,
    ttt_spec,
)
from ttt_mixer.ops.ttt.state import (
    initial_state,
    pack_state,
    state_gate_sums,
    state_length,
    state_momenta,
    state_position,
    state_sums,
    state_tensors,
    state_weights,
)
from ttt_mixer.ops.ttt.step import ttt_family_step, ttt_step
from ttt_mixer.ops.ttt.triton import ttt_chunk_triton, ttt_step_triton

__all__ = [
    "BACKENDS",
    "FAMILY_INNER_MODELS",
    "INNER_LOSSES",
    "INNER_MODELS",
    "UPDATE_ORDERS",
    "FamilySpec",
    "family_ops",
    "initial_state",
    "pack_state",
    "param_names",
    "param_shapes",
    "state_gate_sums",
    "state_length",
    "state_momenta",
    "state_position",
    "state_sums",
    "state_tensors",
    "state_weights",
    "token_scale",
    "ttt_chunk",
    "ttt_chunk_triton",
    "ttt_family_chunk",
    "ttt_family_reference",
    "ttt_family_step",
    "ttt_primal",
    "ttt_spec",
    "ttt_step",
    "ttt_step_triton",
]
