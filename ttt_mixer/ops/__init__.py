"""Pure functions computing TTT (docs/math.md): the primal reference, the chunked dual form and the
decode step in PyTorch, and their Triton counterparts, all on fla's [B, T, H, d] layout with the
same arguments and state tuple. They live in ``ttt_mixer.ops.ttt``, one module per algorithm."""

from ttt_mixer.ops.ttt import (
    INNER_MODELS,
    initial_state,
    pack_state,
    state_length,
    state_position,
    state_sums,
    state_tensors,
    state_weights,
    token_scale,
    ttt_chunk,
    ttt_chunk_triton,
    ttt_primal,
    ttt_step,
    ttt_step_triton,
)

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
