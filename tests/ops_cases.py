"""Shared helpers for tests of the TTT ops (and of the layers and models built on them).

``make_inputs`` builds seeded random arguments of ``ttt_primal`` / ``ttt_chunk`` / ``ttt_step`` in a
realistic range; ``make_state`` builds a random recurrent state (possibly in the middle of a
mini-batch); the remaining functions compare, slice and stack state tuples, whose layout is
``(position [N] int64, W1, b1, [W2, b2,] S_W1, S_b1, [S_W2, S_b2])`` for TTT (see ``ttt_mixer.ops.ttt.state``).
``run`` calls any op (PyTorch or Triton) the same way, ``assert_matches`` compares what two ops give
within the TOLERANCE of docs/conventions.md section 6, ``output_and_state_loss`` is the loss the gradient
tests differentiate, and ``spec_definition`` is TTT written out independently of the ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ttt_mixer.ops import (
    FamilySpec,
    pack_state,
    param_shapes,
    state_position,
    state_tensors,
    token_scale,
    ttt_spec,
)

State = tuple[torch.Tensor, ...]
Op = Callable[..., tuple[torch.Tensor, State | None]]
# the names of the inner params in TTTInputs.float_tensors (w2, b2 for TTT-MLP only)
PARAM_NAMES = ("w1", "b1", "w2", "b2")
# docs/conventions.md section 6: float32 paths agree to 1e-5; float64 paths agree to rounding.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass(frozen=True)
class TTTInputs:
    """The arguments of a TTT op that precede ``initial_state``, in signature order."""

    inner_model: str
    q: torch.Tensor  # [B, T, H, d]
    k: torch.Tensor  # [B, T, H, d]
    v: torch.Tensor  # [B, T, H, d]
    lr: torch.Tensor  # [B, T, H]
    token_offset: torch.Tensor  # [b]
    ln_weight: torch.Tensor | None  # [H, d], or None for f = f_res
    ln_bias: torch.Tensor | None  # [H, d], or None for f = f_res
    params: tuple[torch.Tensor, ...]  # (w1, b1) or (w1, b1, w2, b2)

    @property
    def mini_batch_size(self) -> int:
        return self.token_offset.shape[0]

    @property
    def seq_len(self) -> int:
        return self.q.shape[1]

    def args(self) -> tuple:
        """Positional arguments for ``op(*inputs.args(), initial_state=..., ...)``."""
        return (
            self.inner_model,
            self.q,
            self.k,
            self.v,
            self.lr,
            self.token_offset,
            self.ln_weight,
            self.ln_bias,
            self.params,
        )

    def tokens(self, start: int, end: int) -> TTTInputs:
        """Tokens start..end-1 of every row; the weights are shared."""
        return replace(self, **{name: getattr(self, name)[:, start:end] for name in ("q", "k", "v", "lr")})

    def rows(self, index: int | slice | Sequence[int]) -> TTTInputs:
        """A subset of the batch rows (an int keeps the batch dimension); the weights are shared."""
        index = [index] if isinstance(index, int) else index
        return replace(self, **{name: getattr(self, name)[index] for name in ("q", "k", "v", "lr")})

    def packed(self, lengths: Sequence[int]) -> tuple[TTTInputs, torch.Tensor]:
        """Pack the first lengths[n] tokens of row n into one row [1, sum(lengths), ...]; returns the
        packed inputs and their cu_seqlens [N + 1] (int32, as flash-attention uses)."""
        assert len(lengths) == self.q.shape[0] and max(lengths) <= self.seq_len

        def pack(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([row[:n] for row, n in zip(t, lengths, strict=True)]).unsqueeze(0)

        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return replace(
            self, **{name: pack(getattr(self, name)) for name in ("q", "k", "v", "lr")}
        ), cu_seqlens

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor argument by name (all floating point): the inputs one differentiates."""
        named = {name: getattr(self, name) for name in ("q", "k", "v", "lr", "token_offset")}
        if self.ln_weight is not None:
            named |= {"ln_weight": self.ln_weight, "ln_bias": self.ln_bias}
        names = ["w1", "b1", "w2", "b2"][: len(self.params)]
        return named | dict(zip(names, self.params, strict=True))

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> TTTInputs:
        """A copy with the tensors named as in ``float_tensors`` replaced."""
        names = ["w1", "b1", "w2", "b2"][: len(self.params)]
        params = tuple(tensors.get(name, p) for name, p in zip(names, self.params, strict=True))
        fields = {name: t for name, t in tensors.items() if name not in names}
        return replace(self, params=params, **fields)


def cat_batches(parts: Sequence[TTTInputs]) -> TTTInputs:
    """Concatenate the batch rows of inputs that share their weights and sequence length."""
    return replace(
        parts[0], **{name: torch.cat([getattr(p, name) for p in parts]) for name in ("q", "k", "v", "lr")}
    )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def make_inputs(
    inner_model: str,
    batch_size: int = 2,
    seq_len: int = 8,
    num_heads: int = 2,
    head_dim: int = 4,
    mini_batch_size: int = 4,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    layer_norm: bool = True,
    base_lr: float = 1.0,
) -> TTTInputs:
    """Seeded random inputs of a TTT op, drawn in float64 and then cast, so that the same seed gives
    the same numbers in every dtype.

    q, k, v ~ N(0, 1); lr = base_lr * sigmoid(N(0, 1)) / d (docs/math.md section 2); token_offset ~
    0.05 N(0, 1), so tau_i stays close to 1/i; ln_weight ~ 1 + 0.1 N(0, 1), ln_bias ~ 0.1 N(0, 1)
    (both None when layer_norm is False: f = f_res); inner weights and biases ~ 0.1 N(0, 1).
    """
    g = _generator(seed)
    B, T, H, d, b = batch_size, seq_len, num_heads, head_dim, mini_batch_size
    q, k, v = (_randn(g, B, T, H, d) for _ in range(3))
    lr = base_lr * torch.sigmoid(_randn(g, B, T, H)) / d
    token_offset = 0.05 * _randn(g, b)
    ln_weight, ln_bias = (1.0 + 0.1 * _randn(g, H, d), 0.1 * _randn(g, H, d)) if layer_norm else (None, None)
    params = [0.1 * _randn(g, *shape) for shape in param_shapes(ttt_spec(inner_model, b), H, d)]
    cast = [None if t is None else t.to(dtype) for t in (q, k, v, lr, token_offset, ln_weight, ln_bias)]
    return TTTInputs(inner_model, *cast, params=tuple(p.to(dtype) for p in params))


def make_state(
    inner_model: str,
    positions: Sequence[int],
    num_heads: int = 2,
    head_dim: int = 4,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> State:
    """A random state for len(positions) sequences, sequence n having read positions[n] tokens of its
    current mini-batch: weights ~ 0.1 N(0, 1), accumulators ~ 0.01 N(0, 1) (zero at position 0, as
    after a mini-batch boundary)."""
    g = _generator(seed)
    position = torch.tensor(positions, dtype=torch.long)
    N, H = len(positions), num_heads
    weights, sums = [], []
    for shape in param_shapes(FamilySpec(inner_model), H, head_dim):
        weights.append(0.1 * _randn(g, N, *shape))
        started = (position > 0).to(torch.float64).reshape(N, *[1] * len(shape))
        sums.append(0.01 * _randn(g, N, *shape) * started)
    return pack_state(position, [t.to(dtype) for t in weights], [t.to(dtype) for t in sums])


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; shapes must agree."""
    assert a.shape == b.shape, f"shape {list(a.shape)} != {list(b.shape)}"
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def max_state_diff(s1: State, s2: State) -> float:
    """Largest absolute difference between two states of the same layer type: inf when their lengths
    or their positions differ, else the max over all the floating tensors (in float64)."""
    if len(s1) != len(s2) or not torch.equal(state_position(s1).long(), state_position(s2).long()):
        return float("inf")
    return max(max_abs_diff(a, b) for a, b in zip(state_tensors(s1), state_tensors(s2), strict=True))


def select_state(state: State, index: int | slice | Sequence[int]) -> State:
    """The states of a subset of the sequences (an int keeps the sequence dimension)."""
    index = [index] if isinstance(index, int) else index
    return tuple(t[index] for t in state)


def cat_states(states: Sequence[State]) -> State:
    """Stack the sequences of several states of the same layer type into one state."""
    return tuple(torch.cat(parts) for parts in zip(*states, strict=True))


def detach_state(state: State, requires_grad: bool = False) -> State:
    """A copy of the state cut from the autograd graph, its floating tensors optionally made leaves
    that require grad (the position stays an integer tensor)."""
    return tuple(t.detach().clone().requires_grad_(requires_grad and t.is_floating_point()) for t in state)


def run(
    op: Op,
    inputs: TTTInputs,
    state: State | None = None,
    cu_seqlens: torch.Tensor | None = None,
    final: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, State | None]:
    """``op`` on the inputs from ``state``, returning its final state unless final is False; kwargs go
    to the op (e.g. the Triton ops' checkpoint_every)."""
    return op(*inputs.args(), initial_state=state, output_final_state=final, cu_seqlens=cu_seqlens, **kwargs)


def assert_matches(
    got: tuple[torch.Tensor, State | None], expected: tuple[torch.Tensor, State | None], tol: float
) -> None:
    """Outputs and final states agree within tol."""
    (o, state), (o_ref, state_ref) = got, expected
    assert o.dtype == o_ref.dtype
    assert max_abs_diff(o, o_ref) <= tol, f"outputs differ by {max_abs_diff(o, o_ref):.3g}"
    assert max_state_diff(state, state_ref) <= tol, (
        f"final states differ by {max_state_diff(state, state_ref):.3g}"
    )


def output_and_state_loss(o: torch.Tensor, state: State, seed: int = 1) -> torch.Tensor:
    """A loss that reaches every output and every floating tensor of the final state through fixed
    random weights, normalised so that its gradients are of order one."""
    g = torch.Generator().manual_seed(seed)
    loss = 0.0
    for t in (o, *state_tensors(state)):
        weight = torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
        loss = loss + (t * weight).sum() / t.numel() ** 0.5
    return loss


def spec_definition(inputs: TTTInputs, eps: float = 1e-6) -> tuple[torch.Tensor, State]:
    """docs/math.md sections 1-5 written out independently of the ops: the token gradients by autograd of
    1/2 ||f(k_j; W) - v_j||^2 (f built from F.layer_norm and F.gelu), W_bar_i = W - tau_i S_i with
    S_i = sum_{j <= i} lr_j G_j, o_i = f(q_i; W_bar_i), and W <- W_bar_b at the end of a mini-batch."""
    layer_norm = inputs.ln_weight is not None

    def f(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:  # x [H, d]
        z = torch.einsum("hi,hio->ho", x, weights[0]) + weights[1]
        if len(weights) == 4:
            z = torch.einsum("hi,hio->ho", F.gelu(z, approximate="tanh"), weights[2]) + weights[3]
        if not layer_norm:
            return z
        return x + F.layer_norm(z, z.shape[-1:], eps=eps) * inputs.ln_weight + inputs.ln_bias

    b, tau = inputs.mini_batch_size, token_scale(inputs.token_offset)
    outputs, finals = [], []
    for q, k, v, lr in zip(inputs.q, inputs.k, inputs.v, inputs.lr, strict=True):  # one row at a time
        weights = list(inputs.params)
        sums = [torch.zeros_like(w) for w in weights]
        for t in range(inputs.seq_len):
            leaves = [w.detach().requires_grad_() for w in weights]
            token_loss = 0.5 * ((f(k[t], leaves) - v[t]) ** 2).sum()  # heads are independent
            grads = torch.autograd.grad(token_loss, leaves)
            sums = [s + lr[t].reshape(-1, *[1] * (g.dim() - 1)) * g for s, g in zip(sums, grads, strict=True)]
            weights_bar = [w - tau[t % b] * s for w, s in zip(weights, sums, strict=True)]
            outputs.append(f(q[t], weights_bar))
            if t % b == b - 1:
                weights, sums = weights_bar, [torch.zeros_like(w) for w in weights]
        finals.append((torch.tensor([inputs.seq_len % b]), *(w[None] for w in weights + sums)))
    o = torch.stack(outputs).reshape(inputs.q.shape)
    return o, cat_states(finals)
