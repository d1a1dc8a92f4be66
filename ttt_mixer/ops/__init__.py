"""Pure functions computing TTT (SPEC.md): the primal reference, the chunked dual form and the
decode step in PyTorch, and their Triton counterparts, all on fla's [B, T, H, d] layout with the
same arguments and state tuple."""

from ttt_mixer.ops.chunk import ttt_chunk
from ttt_mixer.ops.common import INNER_MODELS, initial_state, state_length, token_scale
from ttt_mixer.ops.reference import ttt_primal
from ttt_mixer.ops.step import ttt_step
from ttt_mixer.ops.triton_ttt import ttt_chunk_triton, ttt_step_triton

__all__ = [
    "INNER_MODELS",
    "initial_state",
    "state_length",
    "token_scale",
    "ttt_chunk",
    "ttt_chunk_triton",
    "ttt_primal",
    "ttt_step",
    "ttt_step_triton",
]
