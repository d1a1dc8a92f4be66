"""Mamba-2 (``ttt_mixer.adapters.mixers.mamba2``): the chunked scan against its token-by-token
reference (float64, every chunk size, gradients), the mixer against transformers' ``Mamba2Mixer``
(float32, which its PyTorch path computes in) and against its own recurrence written out (float64),
exact caching through gradients, padding and the builder."""

from __future__ import annotations

import pytest
import recurrent_mixer_checks as checks
import torch
import torch.nn.functional as F
from conftest import perturb_
from fla.models.utils import Cache
from recurrent_mixer_checks import EXACT, max_err, randn
from transformers import DynamicCache, Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from ttt_mixer.adapters.mixers import build_mixer, recurrent_state_size
from ttt_mixer.adapters.mixers.mamba2 import MAMBA2_CACHE_ARGUMENT, CachedMamba2Mixer
from ttt_mixer.adapters.mixers.selective_scan import ssd_scan, ssd_scan_reference

HIDDEN = 32


def test_ssd_scan_equals_the_token_by_token_reference_for_every_chunk_size() -> None:
    """Outputs, final state and gradients (initial state included), 4 heads in 2 groups, chunk sizes
    from 1 to longer than the sequence (a last chunk shorter than the rest included)."""
    x, dt = randn(2, 11, 4, 3, seed=0), F.softplus(randn(2, 11, 4, seed=1))
    A = -torch.exp(randn(4, seed=2))
    B, C = randn(2, 11, 2, 5, seed=3), randn(2, 11, 2, 5, seed=4)
    initial = randn(2, 4, 3, 5, seed=5)
    inputs = [t.requires_grad_() for t in (x, dt, A, B, C, initial)]
    y_ref, final_ref = ssd_scan_reference(*inputs)
    weights = randn(*y_ref.shape, seed=6), randn(*final_ref.shape, seed=7)
    grads_ref = torch.autograd.grad((y_ref * weights[0]).sum() + (final_ref * weights[1]).sum(), inputs)
    for chunk_size in (1, 3, 4, 11, 64):
        y, final = ssd_scan(*inputs[:5], chunk_size, initial_state=initial, output_final_state=True)
        assert max_err(y, y_ref) <= EXACT and max_err(final, final_ref) <= EXACT, chunk_size
        grads = torch.autograd.grad((y * weights[0]).sum() + (final * weights[1]).sum(), inputs)
        for name, g, g_ref in zip(["x", "dt", "A", "B", "C", "initial"], grads, grads_ref, strict=True):
            assert max_err(g, g_ref) <= EXACT, (name, chunk_size)
    y, final = ssd_scan(*(t.detach() for t in inputs[:5]), 4, output_final_state=True)
    y_ref, final_ref = ssd_scan_reference(*(t.detach() for t in inputs[:5]))
    assert max_err(y, y_ref) <= EXACT and max_err(final, final_ref) <= EXACT
    with pytest.raises(ValueError, match="groups"):
        ssd_scan(x.detach(), dt.detach(), A.detach(), randn(2, 11, 3, 5, seed=8), randn(2, 11, 3, 5, seed=9))


# transformers' gated RMSNorm normalises per group from 5.23 on, over all channels before (read off a
# mixer's norm: 5.25 renamed its class from MambaRMSNormGated to Mamba2RMSNormGated)
GROUPED_NORM = hasattr(
    Mamba2Mixer(Mamba2Config(hidden_size=8, num_heads=2, head_dim=8, n_groups=1), 0).norm, "group_size"
)


def mixer_pair(dtype: torch.dtype) -> tuple[CachedMamba2Mixer, Mamba2Mixer, Mamba2Config]:
    groups = 2 if GROUPED_NORM or dtype == torch.float64 else 1
    values = {"num_heads": 4, "head_dim": 16, "n_groups": groups, "state_size": 8, "chunk_size": 4}
    config = Mamba2Config(hidden_size=HIDDEN, num_hidden_layers=1, **values)
    torch.manual_seed(0)
    mixer = perturb_(CachedMamba2Mixer(config, 0), 1).to(dtype).eval()
    reference = Mamba2Mixer(config, 0).to(dtype).eval()
    assert mixer.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(mixer.state_dict())
    return mixer, reference, config


def test_mamba2_equals_transformers_mamba2_mixer() -> None:
    """float32: one pass, a left-padded pass, prefill + token-by-token decoding with transformers'
    cache (outputs and states)."""
    mixer, reference, config = mixer_pair(torch.float32)
    x = randn(2, 12, HIDDEN, seed=10).float()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    real = mask.bool()
    with torch.no_grad():
        assert max_err(mixer(x)[0], reference(x)) <= 1e-5
        assert (
            max_err(mixer(x, attention_mask=mask)[0][real], reference(x, attention_mask=mask)[real]) <= 1e-5
        )
        cache, hf_cache = Cache(), DynamicCache(config=config)
        outputs = [mixer(x[:, :7], past_key_values=cache, use_cache=True)[0]]
        hf_outputs = [reference(x[:, :7], **{MAMBA2_CACHE_ARGUMENT: hf_cache})]
        for t in range(7, 12):
            outputs.append(mixer(x[:, t : t + 1], past_key_values=cache, use_cache=True)[0])
            hf_outputs.append(reference(x[:, t : t + 1], **{MAMBA2_CACHE_ARGUMENT: hf_cache}))
    assert max_err(torch.cat(outputs, 1), torch.cat(hf_outputs, 1)) <= 1e-5
    assert max_err(cache[0]["conv_state"], hf_cache.layers[0].conv_states[0]) <= 1e-5
    assert max_err(cache[0]["recurrent_state"], hf_cache.layers[0].recurrent_states[0]) <= 1e-5


def recurrence(mixer: CachedMamba2Mixer, hidden: torch.Tensor) -> torch.Tensor:
    """The layer written out token by token (float64, no padding, no cache): in_proj -> (z, xBC, dt),
    xBC through the zero-padded causal conv and SiLU, the per-head recurrence, D skip, the grouped
    gated RMSNorm, out_proj."""
    length, heads, groups = hidden.shape[1], mixer.num_heads, mixer.n_groups
    z, xBC, dt = mixer.in_proj(hidden).split([mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)
    xBC = F.silu(mixer.conv1d(xBC.transpose(1, 2))[..., :length].transpose(1, 2))
    x, B, C = xBC.split(
        [mixer.intermediate_size, groups * mixer.ssm_state_size, groups * mixer.ssm_state_size], -1
    )
    x = x.unflatten(-1, (heads, mixer.head_dim))
    B, C = (t.unflatten(-1, (groups, -1)).repeat_interleave(heads // groups, dim=2) for t in (B, C))
    dt = F.softplus(dt + mixer.dt_bias)
    A = -torch.exp(mixer.A_log)
    state = hidden.new_zeros(hidden.shape[0], heads, mixer.head_dim, mixer.ssm_state_size)
    outputs = []
    for t in range(length):
        state = torch.exp(dt[:, t] * A)[..., None, None] * state + torch.einsum(
            "bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t]
        )
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + mixer.D[:, None] * x[:, t])
    y = (torch.stack(outputs, 1).flatten(-2) * F.silu(z)).unflatten(-1, (groups, -1))
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + mixer.norm.variance_epsilon)
    return mixer.out_proj(mixer.norm.weight * y.flatten(-2))


def test_mamba2_equals_its_recurrence_and_caches_exactly_in_float64() -> None:
    """The recurrence written out; splits and decoding give the one pass and its states; a prefill +
    continuation in training mode gives the one pass's gradients."""
    mixer, _, _ = mixer_pair(torch.float64)
    x = randn(2, 12, HIDDEN, seed=11)
    full, _ = checks.assert_cached_splits_match(mixer, x, ([1, 11], [5, 7], [2, 1, 6, 3], [1] * 12))
    with torch.no_grad():
        assert max_err(full, recurrence(mixer, x)) <= EXACT
    checks.assert_split_gradients_match(mixer, x, randn(2, 12, HIDDEN, seed=12), split_at=7)


def test_mamba2_skips_padding_anywhere() -> None:
    mixer, _, _ = mixer_pair(torch.float64)
    x = randn(2, 10, HIDDEN, seed=13)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, [0, 1, 5, 6]] = 0
    mask[1, 9] = 0
    checks.assert_padding_skipped(mixer, x, mask, ((0, 5), (5, 8), (8, 10)))


def test_build_mamba2() -> None:
    """The backbone's heads and one group by default, transformers' initialisation and state size,
    Mamba2Config fields as options, errors named."""
    mixer = build_mixer("mamba2", 64, 2, 1)
    assert isinstance(mixer, Mamba2Mixer) and mixer.layer_idx == 1
    assert (mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size) == (2, 64, 1, 128)
    assert torch.equal(mixer.A_log, torch.tensor([1.0, 2.0]).log())
    assert torch.equal(mixer.D, torch.ones(2))
    assert all(p._no_weight_decay for p in (mixer.A_log, mixer.D, mixer.dt_bias))
    assert recurrent_state_size(mixer) == 128 * 128 + (128 + 2 * 128) * 4
    small = build_mixer("mamba2", 64, 8, 0, state_size=16, expand=1, n_groups=4)
    assert (small.num_heads, small.head_dim, small.intermediate_size) == (8, 8, 64)
    with pytest.raises(TypeError, match="mixer 'mamba2'"):
        build_mixer("mamba2", 64, 2, 0, heads=4)
    with pytest.raises(ValueError, match="n_groups"):
        build_mixer("mamba2", 64, 2, 0, n_groups=4)
    with pytest.raises(ValueError, match="head_dim"):
        build_mixer("mamba2", 64, 2, 0, head_dim=48)
