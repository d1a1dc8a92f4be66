"""``chunk_gated_delta_rule`` against the gated delta rule token by token (float64: outputs, final
states, gradients of every input), against fla's own reference (float32), and on bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from recurrent_mixer_checks import EXACT, max_err, randn

from ttt_mixer.adapters.mixers.delta_rule import chunk_gated_delta_rule

# float32, another order of operations than fla's token loop
FLOAT32_TOLERANCE = 1e-5


def delta_rule_reference(q, k, v, beta, g, scale, initial_state):
    """The step of the module docstring, one token at a time, in the inputs' dtype: (o, final state)."""
    state = initial_state.clone()
    outputs = []
    for t in range(k.shape[1]):
        state = g[:, t, :, None, None].exp() * state
        error = v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * error)
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, dim=1), state


def delta_inputs(length: int = 11, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """q, k (unit norm), v, beta in (0, 1), g < 0 and an initial state [B=2, H=3, K=4, V=5]."""
    batch, heads, key_dim, value_dim = 2, 3, 4, 5
    q = randn(batch, length, heads, key_dim, seed=seed)
    k = F.normalize(randn(batch, length, heads, key_dim, seed=seed + 1), dim=-1)
    v = randn(batch, length, heads, value_dim, seed=seed + 2)
    beta = torch.sigmoid(randn(batch, length, heads, seed=seed + 3))
    g = -F.softplus(randn(batch, length, heads, seed=seed + 4))
    initial = randn(batch, heads, key_dim, value_dim, seed=seed + 5)
    return [x.to(dtype).requires_grad_() for x in (q, k, v, beta, g, initial)]


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 64])
def test_chunks_equal_the_token_by_token_rule(chunk_size: int) -> None:
    """Outputs, final state and every input's gradient, for chunks that do and do not divide T."""
    inputs = delta_inputs()
    o, final = chunk_gated_delta_rule(
        *inputs[:5], scale=0.7, initial_state=inputs[5], output_final_state=True, chunk_size=chunk_size
    )
    o_ref, final_ref = delta_rule_reference(*inputs[:5], 0.7, inputs[5])
    assert max_err(o, o_ref) <= EXACT and max_err(final, final_ref) <= EXACT
    weights = randn(*o.shape, seed=20), randn(*final.shape, seed=21)
    grads = torch.autograd.grad((o * weights[0]).sum() + (final * weights[1]).sum(), inputs)
    grads_ref = torch.autograd.grad((o_ref * weights[0]).sum() + (final_ref * weights[1]).sum(), inputs)
    assert max(max_err(a, b) for a, b in zip(grads, grads_ref, strict=True)) <= EXACT


def test_matches_fla_reference_in_float32() -> None:
    """fla's ``naive_recurrent_gated_delta_rule``: same signature, same results (its default scale,
    no initial state, no final state asked for)."""
    inputs = [x.detach() for x in delta_inputs(length=70, dtype=torch.float32)]
    o, final = chunk_gated_delta_rule(*inputs[:5])
    o_ref, _ = naive_recurrent_gated_delta_rule(*inputs[:5])
    assert final is None and o.dtype == torch.float32
    assert max_err(o, o_ref) <= FLOAT32_TOLERANCE


def test_a_continuation_from_the_final_state_equals_one_pass() -> None:
    q, k, v, beta, g, initial = (x.detach() for x in delta_inputs(length=9))
    whole, whole_state = chunk_gated_delta_rule(
        q, k, v, beta, g, initial_state=initial, output_final_state=True, chunk_size=4
    )
    first, state = chunk_gated_delta_rule(
        *(x[:, :5] for x in (q, k, v, beta, g)), initial_state=initial, output_final_state=True
    )
    rest, final = chunk_gated_delta_rule(
        *(x[:, 5:] for x in (q, k, v, beta, g)), initial_state=state, output_final_state=True
    )
    assert max_err(torch.cat([first, rest], dim=1), whole) <= EXACT
    assert max_err(final, whole_state) <= EXACT


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        chunk_gated_delta_rule(*delta_inputs()[:5], chunk_size=0)
