"""Input checks of the TTT-family ops, written once: every op (reference, chunked, decode step and the
Triton kernels) checks its arguments here before any work, so that all raise the same errors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ttt_mixer.ops.ttt.inner import param_names, param_shapes
from ttt_mixer.ops.ttt.spec import FamilySpec
from ttt_mixer.ops.ttt.state import State, state_length, state_position, state_tensors


def _check_float(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but q has {dtype}: inputs and weights must share a dtype"
        )


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], form: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {form} = {list(shape)}, got {list(t.shape)}")


def check_sequences(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, eps: float
) -> int:
    """eps, q, k, v [B, T, H, d] and the packing ``cu_seqlens``, as every TTT op takes them; returns the
    number of sequences N."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        # LayerNorm divides by sqrt(var + eps): eps <= 0 gives NaN for constant rows
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have rank 4 [B, T, H, d], got shape {list(q.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    B, T, H, d = q.shape
    if T == 0 or B == 0:
        raise ValueError(f"q must hold at least one token, got shape {list(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        _check_float(name, t, q.dtype)
        _check_shape(name, t, (B, T, H, d), "[B, T, H, d]")
    if cu_seqlens is None:
        return B
    check_cu_seqlens(cu_seqlens, B, T, "q")
    return cu_seqlens.numel() - 1


def check_cu_seqlens(cu_seqlens: object, batch_size: int, seq_len: int, input_name: str) -> None:
    """``cu_seqlens`` [N + 1]: the offsets of N packed sequences in an input (named ``input_name``)
    of batch size 1 and ``seq_len`` tokens, an integer tensor from 0 to seq_len, non-decreasing (a
    sequence may be empty)."""
    if (
        not isinstance(cu_seqlens, torch.Tensor)
        or cu_seqlens.is_floating_point()
        or cu_seqlens.is_complex()
        or cu_seqlens.dtype == torch.bool
        or cu_seqlens.dim() != 1
    ):
        got = (
            f"{cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}"
            if isinstance(cu_seqlens, torch.Tensor)
            else type(cu_seqlens).__name__
        )
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor [N + 1] (int32 or int64), got {got}")
    if batch_size != 1:
        raise ValueError(f"with cu_seqlens, {input_name} must have batch size 1 (packed), got {batch_size}")
    if cu_seqlens.numel() < 2 or cu_seqlens[0] != 0 or cu_seqlens[-1] != seq_len:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T = {seq_len} (the tokens of {input_name}), "
            f"got {cu_seqlens.tolist()}"
        )
    if (cu_seqlens[1:] < cu_seqlens[:-1]).any():
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")


def check_layer_norm(ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, q: torch.Tensor) -> None:
    """The inner LayerNorm: both [H, d] tensors of q's dtype, or both None."""
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must both be tensors, or both None (f = f_res)")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            _check_float(name, t, q.dtype)
            _check_shape(name, t, tuple(q.shape[2:]), "[H, d]")


def spec_label(spec: FamilySpec) -> str:
    """How messages name a spec: TTT-linear / TTT-mlp, else the spec itself."""
    return f"TTT-{spec.inner_model}" if spec.is_plain_ttt() else repr(spec)


def mini_batch_size_of(token_offset: object) -> int:
    """TTT's mini-batch size: the length of its token offsets [b] (checked in full with the rest)."""
    if not isinstance(token_offset, torch.Tensor) or token_offset.dim() != 1 or token_offset.shape[0] < 1:
        got = (
            list(token_offset.shape)
            if isinstance(token_offset, torch.Tensor)
            else type(token_offset).__name__
        )
        raise ValueError(f"token_offset must have shape [mini_batch_size >= 1], got {got}")
    return token_offset.shape[0]


def check_inputs(
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
    """Check every input of a TTT-family op before any work; returns the number of sequences N."""
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
            f"params: {spec_label(spec)} takes {len(names)} inner weights {names}, got {len(params)}"
        )
    for name, param, shape in zip(names, params, param_shapes(spec, H, d), strict=True):
        _check_float(name, param, q.dtype)
        _check_shape(name, param, shape, "[H, d_in, d_out]" if len(shape) == 3 else "[H, d_out]")
    if initial_state is not None:
        check_state(spec, initial_state, num_sequences, H, d, name="initial_state")
        check_state_dtype(state_tensors(initial_state), q.dtype)
    return num_sequences


def check_state_dtype(tensors: tuple[torch.Tensor, ...], input_dtype: torch.dtype) -> None:
    """TypeError unless the floating tensors of ``initial_state`` have the state's dtype: float32, or
    float64 for float64 inputs (docs/conventions.md section 6), as the ops return it; a state is never
    cast silently."""
    expected = torch.promote_types(input_dtype, torch.float32)
    dtypes = sorted({str(t.dtype) for t in tensors if t.dtype != expected})
    if dtypes:
        raise TypeError(
            f"initial_state tensors must be {expected} for {input_dtype} inputs (the state is float32, "
            f"float64 for float64 inputs), got {', '.join(dtypes)}"
        )


def check_state(
    spec: FamilySpec, state: State, num_sequences: int, num_heads: int, head_dim: int, name: str = "state"
) -> None:
    """A state fits the spec and the inputs: its length, number of sequences, positions and shapes."""
    length = state_length(spec)
    if not isinstance(state, (tuple, list)) or len(state) != length:
        got = len(state) if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(
            f"{name} does not belong to a {spec_label(spec)} layer: expected a tuple of {length} "
            f"tensors (position, weights, accumulators), got {got}"
        )
    position = state_position(state)
    if position.dim() != 1 or position.is_floating_point() or position.dtype == torch.bool:
        raise TypeError(f"{name}[0] (position) must be a 1-D integer tensor [N]")
    if position.shape[0] != num_sequences:
        raise ValueError(f"{name} holds {position.shape[0]} sequences but the input has {num_sequences}")
    b = spec.mini_batch_size
    if ((position < 0) | (position >= b)).any():
        raise ValueError(f"{name} positions must lie in [0, mini_batch_size = {b})")
    shapes = param_shapes(spec, num_heads, head_dim)
    copies = 3 if spec.momentum else 2
    expected = [(num_sequences, *shape) for shape in shapes * copies]
    if spec.has_gate_sums:
        expected.append((num_sequences, num_heads, 2))
    for t, shape in zip(state_tensors(state), expected, strict=True):
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} tensor has shape {list(t.shape)}, expected {list(shape)} "
                f"(batch size and layer type of the state must match the input)"
            )


def check_decode_step(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> None:
    """The decode step reads one token per sequence: T = 1 for a batch of rows, or packed sequences of
    one token or none."""
    if cu_seqlens is None:
        T = q.shape[1]
        if T != 1:
            raise ValueError(
                f"the decode step reads one token per sequence: q must be [B, 1, H, d], got T = {T}"
            )
    elif (cu_seqlens[1:] - cu_seqlens[:-1] > 1).any():
        raise ValueError(
            "the decode step reads at most one token per sequence: cu_seqlens segments must be 0 or 1"
        )


def check_triton_inputs(
    q: torch.Tensor,
    lr: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    interpret: bool,
) -> None:
    """What the Triton kernels need besides ``check_inputs``: one learning rate per token, the inner
    LayerNorm, and CUDA tensors unless Triton's interpreter runs them."""
    if lr.dim() != 3:
        raise ValueError(
            f"the Triton TTT kernels take one lr per token: lr must be [B, T, H], got {list(lr.shape)}"
        )
    if ln_weight is None or ln_bias is None:
        raise ValueError(
            "the Triton TTT kernels need the inner LayerNorm: ln_weight and ln_bias must be tensors, "
            "not None (use ttt_chunk / ttt_step for f = f_res)"
        )
    if q.device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"the Triton TTT kernels need CUDA tensors (got {q.device}), or the Triton interpreter "
            "(the TRITON_INTERPRET environment variable set to 1 before ttt_mixer is imported)"
        )


def check_checkpoint_every(checkpoint_every: int) -> None:
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
