"""Input checks of the TTT-family ops, run by every form before any work."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttt_mixer.ops.ttt.checks import (
    _check_float,
    _check_shape,
    check_layer_norm,
    check_sequences,
    check_state_dtype,
)
from ttt_mixer.ops.ttt_family.inner import param_names, param_shapes
from ttt_mixer.ops.ttt_family.spec import FamilySpec
from ttt_mixer.ops.ttt_family.state import State, family_state_length, family_state_position


def check_family_inputs(
    spec: FamilySpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_offset: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    params: Sequence[torch.Tensor],
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    initial_state: State | None,
    cu_seqlens: torch.Tensor | None,
    eps: float,
) -> int:
    """Check every input of a TTT-family op; returns the number of sequences N."""
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"spec must be a FamilySpec, got {type(spec).__name__}")
    num_sequences = check_sequences(q, k, v, cu_seqlens, eps)
    B, T, H, d = q.shape
    _check_float("lr", lr, q.dtype)
    if tuple(lr.shape) not in ((B, T, H), (B, T, H, spec.num_matrices)):
        raise ValueError(
            f"lr must have shape [B, T, H] = {[B, T, H]} or [B, T, H, {spec.num_matrices}] (one per "
            f"inner matrix), got {list(lr.shape)}"
        )
    if token_offset is not None:
        _check_float("token_offset", token_offset, q.dtype)
        _check_shape("token_offset", token_offset, (spec.mini_batch_size,), "[mini_batch_size]")
    check_layer_norm(ln_weight, ln_bias, q)
    if spec.loss == "dot_product" and ln_weight is not None:
        raise ValueError("the dot_product loss takes no inner LayerNorm: ln_weight and ln_bias must be None")
    for name, gate, used in (("momentum", momentum, spec.momentum), ("forget", forget, spec.forgetting)):
        if used != (gate is not None):
            raise ValueError(
                f"{name} must be a [B, T, H] tensor when the spec has "
                f"{'momentum' if name == 'momentum' else 'forgetting'} on, and None otherwise"
            )
        if gate is not None:
            _check_float(name, gate, q.dtype)
            _check_shape(name, gate, (B, T, H), "[B, T, H]")
    names = param_names(spec)
    if len(params) != len(names):
        raise ValueError(
            f"params: the {spec.inner_model} inner model takes {len(names)} weights {names}, got {len(params)}"
        )
    for name, param, shape in zip(names, params, param_shapes(spec, H, d), strict=True):
        _check_float(name, param, q.dtype)
        _check_shape(name, param, shape, "[H, ...]")
    if initial_state is not None:
        check_family_state(spec, initial_state, num_sequences, H, d)
        check_state_dtype(tuple(initial_state[1:]), q.dtype)
    return num_sequences


def check_family_state(
    spec: FamilySpec, state: State, num_sequences: int, num_heads: int, head_dim: int
) -> None:
    """A state fits the spec and the inputs: its length, sequences, positions and matrix shapes."""
    length = family_state_length(spec)
    if not isinstance(state, (tuple, list)) or len(state) != length:
        got = len(state) if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(
            f"initial_state does not belong to this spec {spec}: expected {length} tensors, got {got}"
        )
    position = family_state_position(state)
    if position.dim() != 1 or position.is_floating_point() or position.dtype == torch.bool:
        raise TypeError("initial_state[0] (position) must be a 1-D integer tensor [N]")
    if position.shape[0] != num_sequences:
        raise ValueError(
            f"initial_state holds {position.shape[0]} sequences but the input has {num_sequences}"
        )
    if ((position < 0) | (position >= spec.mini_batch_size)).any():
        raise ValueError(f"initial_state positions must lie in [0, mini_batch_size = {spec.mini_batch_size})")
    expected = [
        (num_sequences, *shape)
        for shape in (
            (s[0], s[1] + 1, s[2]) if spec.inner_model != "swiglu" else s
            for s in param_shapes(spec, num_heads, head_dim)
            if len(s) == 3
        )
    ]
    copies = 3 if spec.momentum else 2
    shapes = expected * copies + ([(num_sequences, num_heads, 2)] if spec.has_gate_sums else [])
    for t, shape in zip(state[1:], shapes, strict=True):
        if tuple(t.shape) != shape:
            raise ValueError(f"initial_state tensor has shape {list(t.shape)}, expected {list(shape)}")
