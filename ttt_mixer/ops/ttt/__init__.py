"""Test-time training (TTT-Linear, TTT-MLP), laid out by algorithm as fla lays out its ops.

- ``naive``: the token-by-token primal form ``ttt_primal``, the ground truth, and the reference closed
  forms the fast paths are held to;
- ``chunk``: the chunked dual form ``ttt_chunk`` in PyTorch; ``step``: the decode step ``ttt_step``;
- ``triton``: ``ttt_chunk_triton`` and ``ttt_step_triton`` on the forward kernel of ``triton_forward``
  (its per-mini-batch recurrences in ``triton_linear`` and ``triton_mlp``), the fused backward kernels
  of ``triton_linear_backward`` and ``triton_mlp_backward`` (its hidden tiles' in
  ``triton_mlp_tile_backward``, what both share in ``triton_backward``), and the pieces every kernel
  shares in ``triton_helpers``;
- ``inner``: the inner model and the math the fast paths share; ``state``: the state tuple's layout;
  ``checks``: the input checks of every op; ``grid``: sequences laid out in whole mini-batches.
"""

from ttt_mixer.ops.ttt.chunk import ttt_chunk
from ttt_mixer.ops.ttt.inner import INNER_MODELS, token_scale
from ttt_mixer.ops.ttt.naive import ttt_primal
from ttt_mixer.ops.ttt.state import (
    initial_state,
    pack_state,
    state_length,
    state_position,
    state_sums,
    state_tensors,
    state_weights,
)
from ttt_mixer.ops.ttt.step import ttt_step
from ttt_mixer.ops.ttt.triton import ttt_chunk_triton, ttt_step_triton

__all__ = [
    "INNER_MODELS",
    "initial_state",
    "pack_state",
    "state_length",
    "state_position",
    "state_sums",
    "state_tensors",
    "state_weights",
    "token_scale",
    "ttt_chunk",
    "ttt_chunk_triton",
    "ttt_primal",
    "ttt_step",
    "ttt_step_triton",
]
