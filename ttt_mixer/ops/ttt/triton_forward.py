"""The Triton forward kernel of TTT, one program per (sequence, head), for both inner models: the
program walks its sequence's mini-batches with TTT-Linear's recurrence (``triton_linear``) or
TTT-MLP's (``triton_mlp``), chosen at compile time by NUM_LAYERS; see ``triton_helpers`` for the
recurrence and the argument groups. Each inner model has its own autotuning configs, hence its own
entry in ``FORWARD_KERNELS``."""

from __future__ import annotations

import triton
import triton.language as tl

from ttt_mixer.ops.ttt.triton_helpers import program_setup, tuned
from ttt_mixer.ops.ttt.triton_linear import linear_forward
from ttt_mixer.ops.ttt.triton_mlp import mlp_forward

# TTT-Linear does not tile a hidden layer: its BLOCK_H is never read
LINEAR_CONFIGS = [triton.Config({"BLOCK_H": 16}, num_warps=w) for w in (4, 8, 2)]
# wider hidden tiles spill registers at d = 64 (and take long to compile)
MLP_CONFIGS = [triton.Config({"BLOCK_H": h}, num_warps=w) for h in (32, 16) for w in (4, 8)]


@triton.jit
def ttt_forward_kernel(
    tokens,
    o,
    shared,
    sequences,
    buffers,
    dims,
    NUM_LAYERS: tl.constexpr,
    STORE_CHECKPOINTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """TTT over every mini-batch of one (sequence, head): reads ``tokens`` and ``buffers.initial``,
    writes the outputs o, ``buffers.final`` and, with STORE_CHECKPOINTS, ``buffers.checkpoints``."""
    program = program_setup(shared, sequences, dims, BLOCK_T, BLOCK_D, COMPUTE)
    if NUM_LAYERS == 1:
        linear_forward(
            tokens, o, program, buffers, dims, STORE_CHECKPOINTS, BLOCK_T, BLOCK_D, COMPUTE, PRECISION
        )
    else:
        mlp_forward(
            tokens,
            o,
            program,
            buffers,
            dims,
            STORE_CHECKPOINTS,
            BLOCK_T,
            BLOCK_D,
            BLOCK_H,
            COMPUTE,
            PRECISION,
        )


# number of inner layers -> (kernel, meta-parameters to pass: none when autotuned)
FORWARD_KERNELS = {
    1: tuned(ttt_forward_kernel, LINEAR_CONFIGS),
    2: tuned(ttt_forward_kernel, MLP_CONFIGS),
}
