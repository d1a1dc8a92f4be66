"""Pure functions computing TTT (docs/math.md): the primal reference, the chunked dual form and the
decode step in PyTorch, and their Triton counterparts, all on fla's [B, T, H, d] layout with the
same arguments and state tuple. They live in ``ttt_mixer.ops.ttt``, one module per algorithm, whose
public names this package re-exports."""

from ttt_mixer.ops import ttt
from ttt_mixer.ops.ttt import *  # noqa: F403

__all__ = ttt.__all__
