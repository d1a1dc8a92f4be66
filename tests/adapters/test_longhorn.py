"""Longhorn (``ttt_mixer.adapters.mixers.longhorn``): the scan against its token-by-token reference
and the update written out by hand, the mixer against the authors' layer written out (float64),
exact caching through gradients, padding, defaults and the builder."""

from __future__ import annotations

import math

import pytest
import recurrent_mixer_checks as checks
import torch
import torch.nn.functional as F
from conftest import perturb_
from recurrent_mixer_checks import EXACT, max_err, randn
from transformers import MambaConfig, MambaForCausalLM

from ttt_mixer.adapters import swap_mixer
from ttt_mixer.adapters.mixers import build_mixer, recurrent_state_size
from ttt_mixer.adapters.mixers.longhorn import LonghornMixer, longhorn_scan, longhorn_scan_reference

HIDDEN = 32


def make_mixer(seed: int = 0, **options) -> LonghornMixer:
    torch.manual_seed(seed)
    mixer = LonghornMixer(hidden_size=HIDDEN, d_state=8, layer_idx=0, **options)
    return perturb_(mixer, seed + 1).double().eval()


def test_the_update_by_hand() -> None:
    """Two steps of one channel with a 2-dim key, from the paper's closed form."""
    x, dt = torch.tensor([[[0.7], [-1.2]]]), torch.tensor([[[0.3], [-0.5]]])
    k, q = torch.tensor([[[0.5, -1.0], [2.0, 0.25]]]), torch.tensor([[[1.5, 0.5], [-1.0, 2.0]]])
    state, expected = [0.0, 0.0], []
    for t in range(2):
        beta = 1 / (1 + math.exp(-dt[0, t, 0].item()))
        keys = k[0, t].tolist()
        delta = beta / (1 + beta * sum(key * key for key in keys))
        state = [
            (1 - delta * key * key) * s + delta * x[0, t, 0].item() * key
            for s, key in zip(state, keys, strict=True)
        ]
        expected.append(sum(s * query for s, query in zip(state, q[0, t].tolist(), strict=True)))
    inputs = (x.double(), dt.double(), k.double(), q.double())
    for y, final in (longhorn_scan(*inputs, output_final_state=True), longhorn_scan_reference(*inputs)):
        assert max_err(y[0, :, 0], torch.tensor(expected, dtype=torch.float64)) <= EXACT
        assert max_err(final[0, 0], torch.tensor(state, dtype=torch.float64)) <= EXACT


def test_the_scan_equals_the_token_by_token_reference() -> None:
    """Outputs, final state and the gradients of x, dt, k, q and the initial state, float64."""
    x, dt = randn(2, 11, 5, seed=0), randn(2, 11, 5, seed=1)
    k, q = randn(2, 11, 4, seed=2), randn(2, 11, 4, seed=3)
    initial = randn(2, 5, 4, seed=4)
    inputs = [t.requires_grad_() for t in (x, dt, k, q, initial)]
    y, final = longhorn_scan(*inputs, output_final_state=True)
    y_ref, final_ref = longhorn_scan_reference(*inputs)
    assert max_err(y, y_ref) <= EXACT and max_err(final, final_ref) <= EXACT
    weights = randn(*y.shape, seed=5), randn(*final.shape, seed=6)
    grads = torch.autograd.grad((y * weights[0]).sum() + (final * weights[1]).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * weights[0]).sum() + (final_ref * weights[1]).sum(), inputs)
    for name, g, g_ref in zip(["x", "dt", "k", "q", "initial"], grads, grads_ref, strict=True):
        assert max_err(g, g_ref) <= EXACT, name
    # the decay 1 - delta k^2 stays in (0, 1]: the state cannot blow up, whatever the key's size
    big_k = 30 * k.detach()
    _, state = longhorn_scan(x.detach(), dt.detach() + 5, big_k, q.detach(), output_final_state=True)
    assert torch.isfinite(state).all() and state.abs().max() <= x.abs().max() / big_k.abs().min()


def authors_forward(mixer: LonghornMixer, hidden: torch.Tensor) -> torch.Tensor:
    """The authors' Longhorn layer on a whole sequence, written out from their description: x and z
    from in_proj, x through the padded conv1d (cut to T) and SiLU, x_proj split into (dt, k, q), the
    rate sigmoid(dt_head.weight dt + dt_head.bias) normalised by 1 + rate |k|^2, the diagonal
    online update, y = S q + D x, times silu(z), out_proj."""
    length = hidden.shape[1]
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)
    x = F.silu(mixer.conv1d(x.transpose(1, 2))[..., :length]).transpose(1, 2)
    dt, k, q = torch.split(mixer.x_proj(x), [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    rate = torch.sigmoid(dt @ mixer.dt_head.weight.T + mixer.dt_head.bias)
    rate = rate / (1 + rate * (k**2).sum(-1, keepdim=True))
    state = hidden.new_zeros(hidden.shape[0], mixer.d_inner, mixer.d_state)
    outputs = []
    for t in range(length):
        forget = 1 - rate[:, t, :, None] * k[:, t, None, :] ** 2
        state = forget * state + (rate[:, t] * x[:, t])[:, :, None] * k[:, t, None, :]
        outputs.append(torch.einsum("bdn,bn->bd", state, q[:, t]))
    y = (torch.stack(outputs, 1) + x * mixer.D) * F.silu(z)
    return mixer.out_proj(y)


def test_the_mixer_equals_the_authors_layer() -> None:
    mixer = make_mixer()
    x = randn(2, 13, HIDDEN, seed=7)
    with torch.no_grad():
        assert max_err(mixer(x)[0], authors_forward(mixer, x)) <= EXACT


def test_caching_is_exact_for_every_split_and_through_gradients() -> None:
    """Splits and token-by-token decoding give the one pass and its final states (float64); in
    training mode a prefill + continuation gives the one pass's gradients."""
    mixer = make_mixer()
    x = randn(2, 12, HIDDEN, seed=8)
    _, entry = checks.assert_cached_splits_match(mixer, x, ([1, 11], [4, 8], [3, 1, 4, 4], [1] * 12))
    assert entry["conv_state"].shape == (2, mixer.d_inner, mixer.d_conv)
    assert entry["recurrent_state"].shape == (2, mixer.d_inner, mixer.d_state)
    checks.assert_split_gradients_match(mixer, x, randn(2, 12, HIDDEN, seed=9), split_at=5)


def test_padding_is_skipped_in_prefill_and_decoding() -> None:
    """Left padding shorter than the convolution, and padding inside a cached continuation: each row's
    real tokens give that row's outputs alone, padded positions 0 (float64)."""
    mixer = make_mixer()
    x = randn(2, 10, HIDDEN, seed=10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :2] = 0
    mask[0, 6] = 0
    mask[1, 7] = 0
    checks.assert_padding_skipped(mixer, x, mask, ((0, 6), (6, 7), (7, 10)))


def test_defaults_follow_the_authors() -> None:
    """d_state 16, d_conv 4, expand 2, dt_rank ceil(hidden / 16), conv bias, no projection biases,
    D = 1, the rate's bias 0; the state is d_inner (d_state + d_conv) numbers."""
    mixer = build_mixer("longhorn", 64, 1, 0)
    shapes = {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    assert shapes == {
        "in_proj.weight": (256, 64),
        "conv1d.weight": (128, 1, 4),
        "conv1d.bias": (128,),
        "x_proj.weight": (4 + 2 * 16, 128),
        "dt_head.weight": (128, 4),
        "dt_head.bias": (128,),
        "out_proj.weight": (64, 128),
        "D": (128,),
    }
    assert torch.equal(mixer.D, torch.ones(128)) and torch.equal(mixer.dt_head.bias, torch.zeros(128))
    assert mixer.D._no_weight_decay
    assert recurrent_state_size(mixer) == 128 * (16 + 4)
    assert build_mixer("longhorn", 64, 1, 0, dt_rank=2, expand=1).x_proj.weight.shape == (2 + 32, 64)
    with pytest.raises(TypeError, match="mixer 'longhorn'"):
        build_mixer("longhorn", 64, 1, 0, num_state=3)
    with pytest.raises(ValueError, match="d_state"):
        build_mixer("longhorn", 64, 1, 0, d_state=0)


def test_init_options_hold_alone_and_in_a_model() -> None:
    """``initializer_range``, ``dt_bias_init`` and ``D_init`` set the in, x and out projections'
    spread, the rate's bias and the skip D, in the mixer alone and in a model, whose backbone init
    (N(0, 0.02) here) runs first; without them the model's mixer keeps the backbone's spread, a zero
    bias and D = 1. Bad values name the option."""
    torch.manual_seed(0)
    options = {"initializer_range": 0.1, "dt_bias_init": -3.0, "D_init": 0.0}
    base = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, state_size=4))

    def mixers(model: torch.nn.Module) -> list[LonghornMixer]:
        return [module for module in model.modules() if isinstance(module, LonghornMixer)]

    in_models = mixers(swap_mixer(base, "longhorn", **options))
    assert len(in_models) == 2
    for mixer in [build_mixer("longhorn", 64, 1, 0, **options), *in_models]:
        assert torch.equal(mixer.dt_head.bias, torch.full((128,), -3.0))
        assert torch.equal(mixer.D, torch.zeros(128))
        for linear in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
            assert abs(linear.weight.std().item() - 0.1) < 0.01
    for mixer in mixers(swap_mixer(base, "longhorn")):
        assert torch.equal(mixer.dt_head.bias, torch.zeros(128))
        assert torch.equal(mixer.D, torch.ones(128))
        assert abs(mixer.in_proj.weight.std().item() - base.config.initializer_range) < 0.005
    for name, value, error in [
        ("initializer_range", 0.0, ValueError),
        ("initializer_range", "0.1", TypeError),
        ("dt_bias_init", math.inf, ValueError),
        ("dt_bias_init", True, TypeError),
        ("D_init", -math.inf, ValueError),
        ("D_init", None, TypeError),
    ]:
        with pytest.raises(error, match=name):
            build_mixer("longhorn", 64, 1, 0, **{name: value})


def test_float32_agrees_with_float64() -> None:
    mixer = make_mixer()
    x = randn(2, 9, HIDDEN, seed=11)
    with torch.no_grad():
        expected = mixer(x)[0]
        out = mixer.float()(x.float())[0]
    assert out.dtype == torch.float32 and max_err(out.double(), expected) <= 1e-5
