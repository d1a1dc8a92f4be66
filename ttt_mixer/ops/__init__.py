"""Pure functions computing the TTT family (docs/math.md): the token-by-token reference, the chunked
form and the decode step in PyTorch for every spec, and the Triton kernels for TTT-Linear and TTT-MLP,
all on fla's [B, T, H, d] layout with the same arguments and state tuple. They live in
``ttt_mixer.ops.ttt``, one module per algorithm, whose public names this package re-exports."""

from ttt_mixer.ops import ttt
from ttt_mixer.ops.ttt import *  # noqa: F403

__all__ = ttt.__all__
