"""Tests of the TTT-family layers (``TTTFamilyLayer``: Titans and LaCT) in float64: exact continuation
through fla's Cache at every split, padding and packed sequences equal to each sequence alone, LaCT's
sliding-window attention against a written-out softmax and its short convolutions, gradients, bad
options, and the presets in TTTConfig: save and reload, generation with the cache equal to
recomputation."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_model_outputs, greedy_without_cache, make_model, perturb_
from fla.models.utils import Cache

from ttt_mixer import TTTConfig, TTTForCausalLM
from ttt_mixer.layers import FAMILY_PRESETS, TTTFamilyLayer
from ttt_mixer.modules.sliding_window import sliding_window_attention

HIDDEN, T = 16, 11
# id -> (preset, options): each preset, Titans with its memory's residual and LayerNorm, LaCT with
# its q, k, v convolved
VARIANTS = {
    **{preset: (preset, {}) for preset in FAMILY_PRESETS},
    "titans-residual-norm": ("titans", {"memory_residual_norm": True}),
    "lact-short-conv": ("lact", {"use_short_conv": True}),
}
presets = pytest.mark.parametrize("variant", VARIANTS)


def make_family_layer(
    variant: str, seed: int = 0, hidden: int = HIDDEN, mini_batch: int = 4
) -> TTTFamilyLayer:
    """Mini-batches of 4 and (LaCT) a window of 3, so that updates and the window both act."""
    torch.manual_seed(seed)
    preset, options = VARIANTS[variant]
    extra = {"window_size": mini_batch - 1} if preset == "lact" else {}
    layer = TTTFamilyLayer(hidden, 2, preset, mini_batch_size=mini_batch, layer_idx=0, **extra, **options)
    return perturb_(layer, seed + 1).double()


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flat_tensors(value: torch.Tensor | tuple) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else [t for item in value for t in flat_tensors(item)]


def cache_tensors(cache: Cache) -> list[torch.Tensor]:
    entry = cache[0]
    return flat_tensors((entry["recurrent_state"], entry["conv_state"]))


def in_pieces(layer: TTTFamilyLayer, x: torch.Tensor, lengths: list[int], **kwargs) -> tuple:
    cache, outputs, start = Cache(), [], 0
    for n in lengths:
        outputs.append(layer(x[:, start : start + n], past_key_values=cache, use_cache=True, **kwargs)[0])
        start += n
    return torch.cat(outputs, dim=1), cache_tensors(cache)


def assert_all_close(got: list[torch.Tensor], expected: list[torch.Tensor], tol: float = 1e-10) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        assert (a.double() - b.double()).abs().max().item() <= tol if a.numel() else True


@presets
@pytest.mark.parametrize("lengths", [[5, 6], [4, 7], [1] * T, [3, 1, 5, 2], [9, 1, 1]], ids=str)
def test_continuation_equals_one_pass(variant: str, lengths: list[int]) -> None:
    layer = make_family_layer(variant)
    x = randn(2, T, HIDDEN, seed=1)
    whole, whole_state = in_pieces(layer, x, [T])
    assert_all_close([layer(x)[0]], [whole])
    o, state = in_pieces(layer, x, lengths)
    assert_all_close([o, *state], [whole, *whole_state])


@presets
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_and_packed_equal_each_sequence_alone(variant: str, side: str) -> None:
    layer = make_family_layer(variant)
    lengths = (11, 3, 7)
    sequences = [randn(n, HIDDEN, seed=10 + n) for n in lengths]
    x = randn(3, T, HIDDEN, seed=2) * 10
    mask = torch.zeros(3, T, dtype=torch.long)
    places = []
    for i, s in enumerate(sequences):
        place = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        x[i, place], mask[i, place] = s, 1
        places.append(place)
    padded, padded_state = in_pieces(layer, x, [T], attention_mask=mask)
    cu_seqlens = torch.tensor([0, 11, 14, 21])
    packed, packed_state = in_pieces(layer, torch.cat(sequences)[None], [21], cu_seqlens=cu_seqlens)
    for i, (s, place) in enumerate(zip(sequences, places, strict=True)):
        alone, alone_state = in_pieces(layer, s[None], [len(s)])
        assert_all_close([padded[i, place][None]], [alone])
        assert_all_close([packed[:, cu_seqlens[i] : cu_seqlens[i + 1]]], [alone])
        for state in (padded_state, packed_state):
            assert_all_close([t[i : i + 1] for t in state], alone_state)


def test_lact_short_conv_with_identity_kernels_is_lact_without_it() -> None:
    """With identity kernels (last tap 1, bias 0) the convolved layer is LaCT without them; any other
    kernel changes its output."""
    plain = make_family_layer("lact")
    convolved = make_family_layer("lact-short-conv")
    convolved.load_state_dict(plain.state_dict(), strict=False)
    x = randn(2, T, HIDDEN, seed=3)
    with torch.no_grad():
        for conv in (convolved.q_conv1d, convolved.k_conv1d, convolved.v_conv1d):
            conv.weight.zero_()
            conv.weight[..., -1] = 1.0
            conv.bias.zero_()
        assert_all_close([convolved(x)[0]], [plain(x)[0]])
        convolved.k_conv1d.weight[..., 0] = 0.5
        assert (convolved(x)[0] - plain(x)[0]).abs().max() > 1e-3


def test_sliding_window_attention_matches_a_written_out_softmax() -> None:
    q, k, v = (randn(2, 9, 2, 4, seed=s) for s in (3, 4, 5))
    window = 3
    o, state = sliding_window_attention(q, k, v, None, window)
    scores = torch.einsum("bihe,bjhe->bhij", q, k) / 2.0
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    scores = scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    expected = torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v)
    assert_all_close([o, state[0], state[1]], [expected, k[:, -2:], v[:, -2:]])
    assert state[2].all() and state[3].tolist() == [9, 9]
    one_head, _ = sliding_window_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, window)
    assert_all_close([one_head], [expected[:, :, :1]])


@presets
def test_gradcheck_wrt_input(variant: str) -> None:
    layer = make_family_layer(variant, hidden=8, mini_batch=3)
    x = randn(1, 5, 8, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"preset": "mamba"}, ValueError, "preset must be one of"),
        ({"hidden_size": 10, "num_heads": 3}, ValueError, "num_heads"),
        ({"mini_batch_size": 0}, ValueError, "mini_batch_size"),
        ({"window_size": 1.5}, TypeError, "window_size"),
        ({"use_muon": 1}, TypeError, "use_muon"),
        ({"base_lr": -1.0}, ValueError, "base_lr"),
        ({"preset": "titans", "window_size": 8}, ValueError, "window_size and use_muon belong to the preset"),
        ({"preset": "titans", "use_muon": True}, ValueError, "window_size and use_muon belong to the preset"),
        ({"memory_residual_norm": True}, ValueError, "memory_residual_norm belongs to the preset 'titans'"),
        ({"preset": "titans", "memory_residual_norm": 1}, TypeError, "memory_residual_norm"),
        (
            {"preset": "titans", "use_short_conv": True},
            ValueError,
            "use_short_conv belongs to the preset 'lact'",
        ),
        ({"use_short_conv": "yes"}, TypeError, "use_short_conv"),
    ],
    ids=[
        "preset",
        "heads",
        "mini_batch",
        "window",
        "muon",
        "base_lr",
        "titans-window",
        "titans-muon",
        "lact-residual-norm",
        "residual-norm-type",
        "titans-short-conv",
        "short-conv-type",
    ],
)
def test_constructor_rejects_bad_options(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TTTFamilyLayer(**{"hidden_size": 16, "num_heads": 2, "preset": "lact", **kwargs})


@pytest.mark.parametrize(
    "fields, error, match",
    [
        ({"ttt_preset": "rwkv"}, ValueError, "ttt_preset must be one of"),
        ({"ttt_preset": "lact", "window_size": 0}, ValueError, "window_size"),
        ({"use_muon": True}, ValueError, "belong to ttt_preset 'lact'"),
        ({"ttt_preset": "titans", "window_size": 8}, ValueError, "window_size and use_muon belong"),
        ({"memory_residual_norm": True}, ValueError, "memory_residual_norm to 'titans'"),
        (
            {"ttt_preset": "lact", "memory_residual_norm": True},
            ValueError,
            "memory_residual_norm belongs to the preset 'titans'",
        ),
        ({"ttt_preset": "titans", "memory_residual_norm": "yes"}, TypeError, "memory_residual_norm"),
        ({"use_short_conv": True}, ValueError, "use_short_conv belong to ttt_preset 'lact'"),
        (
            {"ttt_preset": "titans", "use_short_conv": True},
            ValueError,
            "use_short_conv belongs to the preset 'lact'",
        ),
    ],
)
def test_config_rejects_bad_preset_fields(fields: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TTTConfig(hidden_size=16, num_attention_heads=2, **fields)


@pytest.fixture(
    scope="module",
    params=[
        ("titans", {}),
        ("titans", {"memory_residual_norm": True}),
        ("lact", {"window_size": 3, "use_muon": True}),
        ("lact", {"window_size": 3, "use_short_conv": True}),
    ],
    ids=["titans", "titans-residual-norm", "lact-muon", "lact-short-conv"],
)
def preset_model(request: pytest.FixtureRequest) -> TTTForCausalLM:
    preset, fields = request.param
    return make_model("linear", "mamba", dtype=torch.float64, ttt_preset=preset, **fields)


def test_preset_model_generates_with_the_cache_as_without(preset_model: TTTForCausalLM) -> None:
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        cached = preset_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(cached, greedy_without_cache(preset_model, ids, 6, mask))


def test_preset_model_saves_and_reloads(preset_model: TTTForCausalLM, tmp_path) -> None:
    preset_model.save_pretrained(tmp_path)
    reloaded = TTTForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    assert reloaded.config.ttt_preset == preset_model.config.ttt_preset
    assert reloaded.config.memory_residual_norm == preset_model.config.memory_residual_norm
    assert reloaded.config.use_short_conv == preset_model.config.use_short_conv
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert_same_model_outputs(reloaded(ids).logits, preset_model(ids).logits)
