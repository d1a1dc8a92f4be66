"""The one choice of implementation for every TTT-family op: ``family_ops(spec, backend)`` gives the
whole-sequence op and the decode step, both in the arguments of ``ttt_family_chunk``. PyTorch
(``chunk``, ``step``) runs every spec; the Triton kernels (``triton``) are the fast path for the specs
they cover, TTT-Linear and TTT-MLP (``FamilySpec.is_plain_ttt``); asking Triton for another spec is
an error, never a silent fallback."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ttt_mixer.ops.ttt.chunk import ttt_family_chunk
from ttt_mixer.ops.ttt.spec import FamilySpec
from ttt_mixer.ops.ttt.state import State
from ttt_mixer.ops.ttt.step import ttt_family_step
from ttt_mixer.ops.ttt.triton import ttt_chunk_triton, ttt_step_triton

BACKENDS = ("torch", "triton")
FamilyOp = Callable[..., tuple[torch.Tensor, State | None]]


def on_triton(ttt_op: FamilyOp) -> FamilyOp:
    """A Triton op of TTT (``ttt_chunk_triton`` or ``ttt_step_triton``) in the family's arguments."""

    def run(
        spec: FamilySpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lr: torch.Tensor,
        token_offset: torch.Tensor,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        params: Sequence[torch.Tensor],
        momentum: torch.Tensor | None = None,
        forget: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, State | None]:
        if momentum is not None or forget is not None:
            raise ValueError(f"momentum and forget must be None for {spec}, which has no gates")
        if not isinstance(token_offset, torch.Tensor) or token_offset.shape != (spec.mini_batch_size,):
            raise ValueError(f"token_offset must have shape [mini_batch_size] = [{spec.mini_batch_size}]")
        return ttt_op(spec.inner_model, q, k, v, lr, token_offset, ln_weight, ln_bias, params, **kwargs)

    return run


TRITON_OPS = (on_triton(ttt_chunk_triton), on_triton(ttt_step_triton))


def family_ops(spec: FamilySpec, backend: str) -> tuple[FamilyOp, FamilyOp]:
    """(whole-sequence op, decode-step op) of ``spec`` on ``backend`` (``"torch"`` or ``"triton"``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return ttt_family_chunk, ttt_family_step
    if not spec.is_plain_ttt():
        raise ValueError(
            f"the Triton kernels cover TTT-Linear and TTT-MLP only, not {spec}: use backend='torch'"
        )
    return TRITON_OPS
