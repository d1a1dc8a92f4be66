"""Input checks of the TTT ops, written once: every op (primal, chunked, decode step and their Triton
counterparts) checks its arguments here before any work, so that all raise the same errors."""

from __future__ import annotations

import math

import torch

from ttt_mixer.ops.ttt.inner import InnerModel
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


def check_inputs(
    inner: InnerModel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_offset: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    params: list[torch.Tensor],
    initial_state: State | None,
    cu_seqlens: torch.Tensor | None,
    eps: float,
) -> int:
    """Check every input of a TTT op before any work; returns the number of sequences N."""
    num_sequences = check_sequences(q, k, v, cu_seqlens, eps)
    H, d = q.shape[2:]
    _check_float("lr", lr, q.dtype)
    _check_shape("lr", lr, tuple(q.shape[:3]), "[B, T, H]")
    _check_float("token_offset", token_offset, q.dtype)
    if token_offset.dim() != 1 or token_offset.shape[0] < 1:
        raise ValueError(
            f"token_offset must have shape [mini_batch_size >= 1], got {list(token_offset.shape)}"
        )
    check_layer_norm(ln_weight, ln_bias, q)
    if len(params) != 2 * inner.num_layers:
        raise ValueError(
            f"params: TTT-{inner.name} takes {2 * inner.num_layers} inner weights (w1, b1[, w2, b2]), got {len(params)}"
        )
    for i, (d_in, d_out) in enumerate(inner.layer_shapes(d)):
        _check_float(f"w{i + 1}", params[2 * i], q.dtype)
        _check_shape(f"w{i + 1}", params[2 * i], (H, d_in, d_out), "[H, d_in, d_out]")
        _check_float(f"b{i + 1}", params[2 * i + 1], q.dtype)
        _check_shape(f"b{i + 1}", params[2 * i + 1], (H, d_out), "[H, d_out]")
    if initial_state is not None:
        check_state(inner, initial_state, num_sequences, H, d, token_offset.shape[0], name="initial_state")
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
    inner: InnerModel,
    state: State,
    num_sequences: int,
    num_heads: int,
    head_dim: int,
    mini_batch_size: int,
    name: str = "state",
) -> None:
    """A state fits the inputs: its layer type, number of sequences, positions and shapes."""
    if not isinstance(state, (tuple, list)) or len(state) != state_length(inner):
        got = len(state) if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(
            f"{name} does not belong to a TTT-{inner.name} layer: expected a tuple of {state_length(inner)} "
            f"tensors (position, weights, accumulators), got {got}"
        )
    position = state_position(state)
    if position.dim() != 1 or position.is_floating_point() or position.dtype == torch.bool:
        raise TypeError(f"{name}[0] (position) must be a 1-D integer tensor [N]")
    if position.shape[0] != num_sequences:
        raise ValueError(f"{name} holds {position.shape[0]} sequences but the input has {num_sequences}")
    if ((position < 0) | (position >= mini_batch_size)).any():
        raise ValueError(f"{name} positions must lie in [0, mini_batch_size = {mini_batch_size})")
    shapes = []
    for d_in, d_out in inner.layer_shapes(head_dim):
        shapes += [(d_in, d_out), (d_out,)]
    for t, shape in zip(state_tensors(state), shapes + shapes, strict=True):
        expected = (num_sequences, num_heads, *shape)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} tensor has shape {list(t.shape)}, expected {list(expected)} "
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
    q: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, interpret: bool
) -> None:
    """What the Triton kernels need besides ``check_inputs``: the inner LayerNorm, and CUDA tensors
    unless Triton's interpreter runs them."""
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
