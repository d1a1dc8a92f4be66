"""The scans of ``ttt_mixer.adapters.mixers.selective_scan`` against their token-by-token references
(float64: outputs, final states, gradients), the causal convolution's windows and padding, and the
Mamba mixer built on them against transformers' ``MambaMixer``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_
from fla.models.utils import Cache
from transformers import DynamicCache, MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer

from ttt_mixer.adapters.mixers.common import causal_conv
from ttt_mixer.adapters.mixers.mamba import MAMBA_CACHE_ARGUMENT, CachedMambaMixer
from ttt_mixer.adapters.mixers.selective_scan import (
    online_scan,
    selective_scan,
    selective_scan_reference,
)

EXACT = 1e-12  # float64, same formula
TOLERANCE = 1e-10  # float64, another order of operations (the brief's bound against transformers)
HIDDEN = 32


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def scan_inputs(batch: int = 2, length: int = 9, channels: int = 3, state: int = 4, seed: int = 0):
    """u, delta > 0, A < 0, B, C, initial state: float64, requiring gradients."""
    u, B, C = (
        randn(batch, length, channels, seed=seed),
        randn(batch, length, state, seed=seed + 1),
        randn(batch, length, state, seed=seed + 2),
    )
    delta = F.softplus(randn(batch, length, channels, seed=seed + 3))
    A = -torch.exp(randn(channels, state, seed=seed + 4))
    initial = randn(batch, channels, state, seed=seed + 5)
    return [t.requires_grad_() for t in (u, delta, A, B, C, initial)]


def test_selective_scan_equals_the_token_by_token_reference() -> None:
    """Outputs, final state and the gradients of every input (initial state included) through both."""
    inputs = scan_inputs()
    for initial in (None, inputs[-1]):
        y, final = selective_scan(*inputs[:5], initial_state=initial, output_final_state=True)
        y_ref, final_ref = selective_scan_reference(*inputs[:5], initial_state=initial)
        assert max_err(y, y_ref) <= EXACT and max_err(final, final_ref) <= EXACT
        weights = randn(*y.shape, seed=9), randn(*final.shape, seed=10)
        used = inputs if initial is not None else inputs[:5]
        grads = torch.autograd.grad((y * weights[0]).sum() + (final * weights[1]).sum(), used)
        grads_ref = torch.autograd.grad((y_ref * weights[0]).sum() + (final_ref * weights[1]).sum(), used)
        for name, g, g_ref in zip(["u", "delta", "A", "B", "C", "initial"], grads, grads_ref, strict=False):
            assert max_err(g, g_ref) <= EXACT, name
    assert selective_scan(*inputs[:5])[1] is None


def test_scans_pass_gradcheck() -> None:
    """The hand-written backward against finite differences, through the outputs and the final state
    alone, for Mamba's exponential decay and Longhorn's 1 - delta k^2."""
    u, delta, A, B, C, initial = scan_inputs(length=5, channels=2, state=3)
    assert torch.autograd.gradcheck(
        lambda *x: selective_scan(*x, output_final_state=True), (u, delta, A, B, C, initial)
    )
    assert torch.autograd.gradcheck(
        lambda *x: selective_scan(*x, output_final_state=True)[1], (u, delta, A, B, C)
    )
    rate = torch.sigmoid(delta.detach()).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *x: online_scan(*x, output_final_state=True), (u, rate, B, C, initial)
    )
    assert torch.autograd.gradcheck(lambda *x: online_scan(*x)[0], (u, rate, B, C))


def test_a_scan_continues_from_its_final_state() -> None:
    """Any split of the sequence, each part from the state the previous one ended in, gives the one
    pass; a zero step (delta 0) leaves the state unchanged."""
    u, delta, A, B, C, _ = (t.detach() for t in scan_inputs(length=12))
    y, final = selective_scan(u, delta, A, B, C, output_final_state=True)
    for cut in (1, 5, 11):
        first, state = selective_scan(
            u[:, :cut], delta[:, :cut], A, B[:, :cut], C[:, :cut], output_final_state=True
        )
        second, end = selective_scan(
            u[:, cut:],
            delta[:, cut:],
            A,
            B[:, cut:],
            C[:, cut:],
            initial_state=state,
            output_final_state=True,
        )
        assert max_err(torch.cat([first, second], 1), y) <= EXACT and max_err(end, final) <= EXACT
    still = delta.clone()
    still[:, 6:] = 0
    _, state_at_6 = selective_scan(u[:, :6], delta[:, :6], A, B[:, :6], C[:, :6], output_final_state=True)
    assert max_err(selective_scan(u, still, A, B, C, output_final_state=True)[1], state_at_6) == 0
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(u, delta, A, B, C, initial_state=final[:, :1])


def test_causal_conv_windows_and_padding() -> None:
    """== a zero-padded depthwise conv1d; continues from its window; padding anywhere is skipped
    (outputs 0) and kept out of the window."""
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3).double()
    x = randn(2, 10, 5, seed=1)
    expected = F.silu(conv(x.transpose(1, 2))[..., :10].transpose(1, 2))
    y, window = causal_conv(x, conv.weight[:, 0], conv.bias, None, None, F.silu)
    assert max_err(y, expected) <= EXACT
    assert torch.equal(window, x[:, -4:].transpose(1, 2))
    first, window = causal_conv(x[:, :3], conv.weight[:, 0], conv.bias, None, None, F.silu)
    second, _ = causal_conv(x[:, 3:], conv.weight[:, 0], conv.bias, window, None, F.silu)
    assert max_err(torch.cat([first, second], 1), expected) <= EXACT

    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, [0, 4, 5, 9]] = False
    y, window = causal_conv(x, conv.weight[:, 0], conv.bias, None, mask, F.silu)
    alone, alone_window = causal_conv(x[:1, mask[0]], conv.weight[:, 0], conv.bias, None, None, F.silu)
    assert max_err(y[0, mask[0]], alone[0]) <= EXACT and y[0, ~mask[0]].abs().max() == 0
    assert torch.equal(window[0], alone_window[0]) and max_err(y[1], expected[1]) <= EXACT
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv(x, conv.weight[:, 0], conv.bias, window[:, :2], None)


# ---------------------------------------------------------------------------------------------------
# the Mamba mixer


def mamba_pair(dtype: torch.dtype = torch.float64, **options) -> tuple[CachedMambaMixer, MambaMixer]:
    config = MambaConfig(hidden_size=HIDDEN, num_hidden_layers=1, state_size=8, conv_kernel=4, **options)
    torch.manual_seed(0)
    mixer = perturb_(CachedMambaMixer(config, 0), 1).to(dtype).eval()
    reference = MambaMixer(config, 0).to(dtype).eval()
    assert mixer.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(mixer.state_dict())
    return mixer, reference


def test_mamba_equals_transformers_mamba_mixer_in_float64() -> None:
    """One pass, a left-padded pass, and prefill + decoding token by token (each output against
    transformers' full pass over the prefix, and the cached states against transformers' cache after
    the same prefill), within 1e-10 in float64. transformers' own one-token path rounds its state to
    float32, so its decoding agrees to float32 precision only."""
    mixer, reference = mamba_pair()
    x = randn(2, 12, HIDDEN, seed=2)
    with torch.no_grad():
        expected = reference(x)
        assert max_err(mixer(x)[0], expected) <= TOLERANCE
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, :5] = 0
        real = mask.bool()
        assert (
            max_err(mixer(x, attention_mask=mask)[0][real], reference(x, attention_mask=mask)[real])
            <= TOLERANCE
        )

        cache, hf_cache = Cache(), DynamicCache(config=reference.config)
        outputs = [mixer(x[:, :7], past_key_values=cache, use_cache=True)[0]]
        hf_outputs = [reference(x[:, :7], **{MAMBA_CACHE_ARGUMENT: hf_cache})]
        assert max_err(cache[0]["conv_state"], hf_cache.layers[0].conv_states[0]) <= TOLERANCE
        assert max_err(cache[0]["recurrent_state"], hf_cache.layers[0].recurrent_states[0]) <= TOLERANCE
        for t in range(7, 12):
            outputs.append(mixer(x[:, t : t + 1], past_key_values=cache, use_cache=True)[0])
            hf_outputs.append(reference(x[:, t : t + 1], **{MAMBA_CACHE_ARGUMENT: hf_cache}))
            assert max_err(outputs[-1][:, 0], reference(x[:, : t + 1])[:, -1]) <= TOLERANCE, t
    assert max_err(torch.cat(hf_outputs, 1), torch.cat(outputs, 1)) <= 1e-5


def test_mamba_gradients_equal_transformers() -> None:
    """Training mode, float64: the input's and every parameter's gradient as through transformers'
    forward (autograd through its loop), to float32 precision: transformers accumulates the
    gradients of the numbers it takes through float32 (A_log, D, the dt bias, u and B) in float32,
    this mixer in float64."""
    mixer, reference = mamba_pair(use_conv_bias=True)
    x = randn(2, 9, HIDDEN, seed=3).requires_grad_()
    weights = randn(2, 9, HIDDEN, seed=4)
    grads = torch.autograd.grad((mixer.train()(x)[0] * weights).sum(), [x, *mixer.parameters()])
    grads_ref = torch.autograd.grad((reference.train()(x) * weights).sum(), [x, *reference.parameters()])
    names = ["input", *(name for name, _ in mixer.named_parameters())]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert max_err(g, g_ref) <= 1e-6 * g_ref.abs().max().item(), name


def test_mamba_float32_and_padding_anywhere() -> None:
    """float32 against transformers; padding in the middle of a cached continuation is skipped
    (transformers' is exact for left padding only)."""
    mixer, reference = mamba_pair(torch.float32)
    x = randn(2, 12, HIDDEN, seed=5).float()
    with torch.no_grad():
        assert max_err(mixer(x)[0], reference(x)) <= 1e-5
    mixer = mixer.double()
    x = x.double()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, [2, 3, 6, 8]] = 0
    cache = Cache()
    with torch.no_grad():
        outputs = [
            mixer(x[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True)[0]
            for a, b in ((0, 3), (3, 7), (7, 12))
        ]
        alone = mixer(x[:1, mask[0].bool()])[0]
    padded = torch.cat(outputs, 1)
    assert max_err(padded[0, mask[0].bool()], alone[0]) <= TOLERANCE
    assert padded[0, ~mask[0].bool()].abs().max() == 0


def test_mamba_gradients_flow_through_the_cache() -> None:
    """Prefill + a continuation of several tokens, in training mode: the same gradients as one pass."""
    mixer, _ = mamba_pair()
    mixer.train()
    x = randn(2, 10, HIDDEN, seed=6).requires_grad_()
    weights = randn(2, 10, HIDDEN, seed=7)
    params = [x, *mixer.parameters()]
    grads = torch.autograd.grad((mixer(x)[0] * weights).sum(), params)
    cache = Cache()
    first = mixer(x[:, :4], past_key_values=cache, use_cache=True)[0]
    second = mixer(x[:, 4:], past_key_values=cache, use_cache=True)[0]
    split_grads = torch.autograd.grad((torch.cat([first, second], 1) * weights).sum(), params)
    for g, g_split in zip(grads, split_grads, strict=True):
        assert max_err(g, g_split) <= TOLERANCE
