"""Tests of the TTT layer on the fla interface (``ttt_mixer.layers``), in float64: its wiring against
a hand-assembled computation on the primal reference, exact continuation through fla's Cache,
padding masks and packed sequences, gradients, and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import INNER_MODELS, assert_same_model_outputs, make_layer
from fla.models.utils import Cache

from ttt_mixer.layers import TTTMLP, TTTLayer, TTTLinear
from ttt_mixer.modules import apply_interleaved_rotary
from ttt_mixer.ops import ttt_primal

TOL = 1e-10  # float64 paths agree to rounding
BASE_LR = {"linear": 1.0, "mlp": 0.1}  # docs/math.md section 2
HIDDEN = 16
B = 4  # mini-batch size of the layers under test

inner_models = pytest.mark.parametrize("inner_model", INNER_MODELS)
conv_gates = pytest.mark.parametrize("conv_gate", [False, True], ids=["plain", "conv_gate"])


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def causal_depthwise_conv(x: torch.Tensor, conv: torch.nn.Conv1d) -> torch.Tensor:
    """x [B, T, D] through a depthwise conv of width K, left-padded with K - 1 zeros."""
    width = conv.weight.shape[-1]
    padded = F.pad(x.transpose(1, 2), (width - 1, 0))
    return F.conv1d(padded, conv.weight, conv.bias, groups=x.shape[-1]).transpose(1, 2)


def reference_forward(
    layer: TTTLayer, x: torch.Tensor, inner_model: str, use_rope: bool = True, base_lr: float | None = None
) -> torch.Tensor:
    """The layer re-assembled by hand from its own parameters, with ``ttt_primal`` for TTT; the base
    learning rate defaults to docs/math.md's (1.0 for TTT-Linear, 0.1 for TTT-MLP)."""
    base_lr = BASE_LR[inner_model] if base_lr is None else base_lr
    batch, seq_len, _ = x.shape
    heads, b, d = layer.num_heads, layer.mini_batch_size, layer.head_dim
    if layer.share_qk:
        shared = x @ layer.q_proj.weight.T
        q = causal_depthwise_conv(shared, layer.q_conv1d)
        k = causal_depthwise_conv(shared, layer.k_conv1d)
    else:
        q, k = x @ layer.q_proj.weight.T, x @ layer.k_proj.weight.T
    v = x @ layer.v_proj.weight.T
    q, k, v = (t.reshape(batch, seq_len, heads, d) for t in (q, k, v))
    lr = base_lr / d * torch.sigmoid(x @ layer.lr_proj.weight.T + layer.lr_proj.bias)
    if use_rope:
        positions = (torch.arange(seq_len) % b).expand(batch, seq_len)
        q = apply_interleaved_rotary(q, positions, 10000.0)
        k = apply_interleaved_rotary(k, positions, 10000.0)
    z, _ = ttt_primal(
        inner_model,
        q,
        k,
        v,
        lr,
        layer.token_offset,
        layer.ttt_norm_weight,
        layer.ttt_norm_bias,
        layer.inner_params(),
        eps=1e-6,
    )
    o = F.layer_norm(
        z.reshape(batch, seq_len, heads * d), (heads * d,), layer.post_norm.weight, layer.post_norm.bias, 1e-6
    )
    if layer.use_gate:
        o = F.gelu(x @ layer.g_proj.weight.T, approximate="tanh") * o
    return o @ layer.o_proj.weight.T


def state_tensors(cache: Cache) -> list[torch.Tensor]:
    """Every tensor the layer keeps in its cache entry: recurrent state, then conv windows."""
    entry = cache[0]
    tensors = list(entry["recurrent_state"])
    if entry["conv_state"] is not None:
        tensors += list(entry["conv_state"])
    return tensors


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not actual.is_floating_point() or actual.dtype == expected.dtype
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), (actual, expected)
        return
    err = (actual - expected).abs().max().item()
    assert err <= tol, f"max abs error {err:.3e} > {tol:.0e}"


def assert_states_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e)


def run_in_chunks(layer: TTTLayer, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, Cache]:
    """Feed x to the layer in consecutive chunks through one Cache; returns all outputs and the cache."""
    assert sum(lengths) == x.shape[1]
    cache, outputs, start = Cache(), [], 0
    for n in lengths:
        o, attentions, returned = layer(x[:, start : start + n], past_key_values=cache, use_cache=True)
        assert attentions is None and returned is cache
        outputs.append(o)
        start += n
    return torch.cat(outputs, dim=1), cache


def alone(layer: TTTLayer, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One sequence x [T, D] alone: its outputs [T, D] and final state tensors."""
    cache = Cache()
    o, _, _ = layer(x[None], past_key_values=cache, use_cache=True)
    return o[0], state_tensors(cache)


def select_rows(tensors: list[torch.Tensor], row: int) -> list[torch.Tensor]:
    return [t[row : row + 1] for t in tensors]


# Wiring ------------------------------------------------------------------------------------------


@inner_models
@conv_gates
@pytest.mark.parametrize("seq_len", [8, 11], ids=["whole_minibatches", "remainder"])
def test_layer_matches_hand_assembled_primal(inner_model: str, conv_gate: bool, seq_len: int) -> None:
    layer = make_layer(inner_model, conv_gate, hidden_size=HIDDEN, mini_batch_size=B)
    x = randn(3, seq_len, HIDDEN, seed=1)
    o, attentions, past = layer(x)
    assert attentions is None and past is None
    assert o.shape == x.shape and o.dtype == torch.float64
    assert_close(o, reference_forward(layer, x, inner_model))


@inner_models
@conv_gates
@pytest.mark.parametrize("head_dim", [6, 12], ids=["narrower", "wider"])
def test_own_head_dim_matches_hand_assembled_primal(inner_model: str, conv_gate: bool, head_dim: int) -> None:
    """head_dim other than hidden_size / num_heads (as Mistral-Nemo's attention has): q, k, v project
    to num_heads * head_dim, o_proj maps it back to hidden_size."""
    layer = make_layer(inner_model, conv_gate, hidden_size=HIDDEN, mini_batch_size=B, head_dim=head_dim)
    assert layer.head_dim == head_dim and layer.q_proj.weight.shape == (2 * head_dim, HIDDEN)
    assert layer.o_proj.weight.shape == (HIDDEN, 2 * head_dim) and layer.w1.shape[1] == head_dim
    x = randn(3, 11, HIDDEN, seed=1)
    o = layer(x)[0]
    assert o.shape == x.shape
    assert_close(o, reference_forward(layer, x, inner_model))
    # prefill then continuation through the cache, split inside a mini-batch, equals one pass
    _, one_pass = run_in_chunks(layer, x, [11])
    chunked, cache = run_in_chunks(layer, x, [5, 1, 5])
    assert_close(chunked, o)
    assert_states_close(state_tensors(cache), state_tensors(one_pass))


@inner_models
@conv_gates
def test_without_rope_and_explicit_base_lr(inner_model: str, conv_gate: bool) -> None:
    layer = make_layer(
        inner_model, conv_gate, hidden_size=HIDDEN, mini_batch_size=B, use_rope=False, base_lr=0.37
    )
    assert layer.base_lr == 0.37
    x = randn(2, 10, HIDDEN, seed=2)
    assert_close(layer(x)[0], reference_forward(layer, x, inner_model, use_rope=False, base_lr=0.37))


@pytest.mark.parametrize("cls, inner_model", [(TTTLinear, "linear"), (TTTMLP, "mlp")])
def test_subclasses_are_the_layer_with_their_inner_model(cls: type, inner_model: str) -> None:
    layer = make_layer(inner_model, hidden_size=HIDDEN, mini_batch_size=B)
    sub = cls(hidden_size=HIDDEN, num_heads=2, mini_batch_size=B, layer_idx=0).to(torch.float64)
    assert sub.spec.inner_model == inner_model and sub.base_lr == BASE_LR[inner_model]
    sub.load_state_dict(layer.state_dict())
    x = randn(2, 7, HIDDEN, seed=3)
    assert_same_model_outputs(sub(x)[0], layer(x)[0])


def test_default_initialisation_follows_spec() -> None:
    torch.manual_seed(0)
    layer = TTTLayer(hidden_size=64, num_heads=4, inner_model="mlp", mini_batch_size=8)
    assert layer.head_dim == 16
    assert torch.equal(layer.token_offset, torch.zeros(8))
    assert torch.equal(layer.ttt_norm_weight, torch.ones(4, 16))
    assert torch.equal(layer.ttt_norm_bias, torch.zeros(4, 16))
    assert layer.w1.shape == (4, 16, 64) and layer.w2.shape == (4, 64, 16)
    assert layer.b1.shape == (4, 64) and layer.b2.shape == (4, 16)
    assert not layer.b1.any() and not layer.b2.any()
    assert abs(layer.w1.std().item() - 0.02) < 0.002


def test_interleaved_rotary_equals_authors_permuted_half_rope() -> None:
    """The authors' permute_qk -> rotate_half RoPE -> undo_permute_qk, written out."""
    batch, seq_len, heads, d = 2, 6, 3, 8
    x = randn(batch, seq_len, heads, d, seed=4)
    positions = (torch.arange(seq_len) % 4).expand(batch, seq_len)
    # theirs works on [B, H, T, d]
    xt = x.transpose(1, 2)
    permuted = xt.reshape(batch, heads, seq_len, d // 2, 2).transpose(3, 4).reshape(batch, heads, seq_len, d)
    # their RotaryEmbedding: frequencies and angles in float32, cos/sin cast to the input's dtype
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = positions[:, :, None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = torch.cat([-permuted[..., d // 2 :], permuted[..., : d // 2]], dim=-1)
    rotated = permuted * cos + half * sin
    undone = (
        rotated.reshape(batch, heads, seq_len, 2, d // 2).transpose(3, 4).reshape(batch, heads, seq_len, d)
    )
    assert_close(apply_interleaved_rotary(x, positions), undone.transpose(1, 2), tol=1e-12)


# Exact continuation through fla's Cache ----------------------------------------------------------


@inner_models
@conv_gates
@pytest.mark.parametrize("split", range(3 * B + 2))
def test_prefill_then_continuation_equals_one_pass(inner_model: str, conv_gate: bool, split: int) -> None:
    seq_len = 3 * B + 2
    layer = make_layer(inner_model, conv_gate, hidden_size=HIDDEN, mini_batch_size=B)
    x = randn(2, seq_len, HIDDEN, seed=5)
    full = layer(x)[0]
    _, one_pass = run_in_chunks(layer, x, [seq_len])
    lengths = [seq_len] if split == 0 else [split, seq_len - split]
    o, cache = run_in_chunks(layer, x, lengths)
    assert_close(o, full)
    assert_states_close(state_tensors(cache), state_tensors(one_pass))
    assert cache[0]["recurrent_state"][0].tolist() == [seq_len % B] * 2
    assert cache.get_seq_length(0) == seq_len


@inner_models
@conv_gates
@pytest.mark.parametrize(
    "lengths",
    [(3, 1, 5, 2), (1,) * 11, (2, 5, 4), (6, 1, 1, 3), (5, 6)],
    ids=["3-1-5-2", "token_by_token", "2-5-4", "6-1-1-3", "5-6"],
)
def test_multi_token_continuations_mid_minibatch(
    inner_model: str, conv_gate: bool, lengths: tuple[int, ...]
) -> None:
    layer = make_layer(inner_model, conv_gate, hidden_size=HIDDEN, mini_batch_size=B)
    x = randn(2, sum(lengths), HIDDEN, seed=6)
    _, one_pass = run_in_chunks(layer, x, [sum(lengths)])
    o, cache = run_in_chunks(layer, x, list(lengths))
    assert_close(o, layer(x)[0])
    assert_states_close(state_tensors(cache), state_tensors(one_pass))


# Padding and packed sequences --------------------------------------------------------------------


def padded_batch(
    sequences: list[torch.Tensor], side: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """Pad sequences [L_i, D] with random junk (not zeros) on one side: (x, mask, real slices)."""
    seq_len = max(s.shape[0] for s in sequences)
    x = randn(len(sequences), seq_len, sequences[0].shape[-1], seed=seed) * 10
    mask = torch.zeros(len(sequences), seq_len, dtype=torch.long)
    places = []
    for i, s in enumerate(sequences):
        n = s.shape[0]
        place = slice(seq_len - n, seq_len) if side == "left" else slice(0, n)
        x[i, place], mask[i, place] = s, 1
        places.append(place)
    return x, mask, places


@inner_models
@conv_gates
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(inner_model: str, conv_gate: bool, side: str) -> None:
    layer = make_layer(inner_model, conv_gate, hidden_size=HIDDEN, mini_batch_size=B)
    sequences = [randn(n, HIDDEN, seed=10 + n) for n in (11, 8, 3, 6)]
    x, mask, places = padded_batch(sequences, side, seed=7)
    cache = Cache()
    o, _, _ = layer(x, attention_mask=mask, past_key_values=cache, use_cache=True)
    batch_state = state_tensors(cache)
    for i, (s, place) in enumerate(zip(sequences, places, strict=True)):
        expected, expected_state = alone(layer, s)
        assert_close(o[i, place], expected)
        assert_states_close(select_rows(batch_state, i), expected_state)
    # the same without a cache
    assert_close(layer(x, attention_mask=mask)[0] * mask[..., None], o * mask[..., None])


@inner_models
@conv_gates
@pytest.mark.parametrize("continuation", [(1, 1, 1), (2, 3, 1)], ids=["decode", "chunks"])
def test_packed_cu_seqlens_equals_separate_runs(
    inner_model: str, conv_gate: bool, continuation: tuple[int, ...]
) -> None:
    layer = make_layer(inner_model, conv_gate, hidden_size=HIDDEN, mini_batch_size=B)
    prompts = [randn(n, HIDDEN, seed=20 + n) for n in (5, 9, 3)]
    follow = [randn(n, HIDDEN, seed=30 + i) for i, n in enumerate(continuation)]

    def cu(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    cache = Cache()
    packed = torch.cat(prompts)[None]
    o, _, _ = layer(packed, past_key_values=cache, use_cache=True, cu_seqlens=cu([5, 9, 3]))
    assert_close(layer(packed, cu_seqlens=cu([5, 9, 3]))[0], o)
    o2, _, _ = layer(
        torch.cat(follow)[None], past_key_values=cache, use_cache=True, cu_seqlens=cu(list(continuation))
    )
    outputs = torch.cat([o, o2], dim=1)[0]
    starts = [0, 5, 14]
    follow_starts = [17, 17 + continuation[0], 17 + continuation[0] + continuation[1]]
    packed_state = state_tensors(cache)
    for i, (p, f) in enumerate(zip(prompts, follow, strict=True)):
        expected, expected_state = alone(layer, torch.cat([p, f]))
        n, m = p.shape[0], f.shape[0]
        assert_close(outputs[starts[i] : starts[i] + n], expected[:n])
        assert_close(outputs[follow_starts[i] : follow_starts[i] + m], expected[n:])
        assert_states_close(select_rows(packed_state, i), expected_state)


@inner_models
@conv_gates
@pytest.mark.parametrize("steps", [(1,) * 6, (3, 1, 2)], ids=["token_by_token", "chunks"])
def test_decoding_after_left_padded_prefill(
    inner_model: str, conv_gate: bool, steps: tuple[int, ...]
) -> None:
    """Generation style: the attention mask grows by columns of ones as tokens are decoded."""
    layer = make_layer(inner_model, conv_gate, hidden_size=HIDDEN, mini_batch_size=B)
    lengths = (6, 3, 9)
    prompts = [randn(n, HIDDEN, seed=40 + n) for n in lengths]
    new = randn(len(lengths), sum(steps), HIDDEN, seed=8)
    x, mask, _ = padded_batch(prompts, "left", seed=9)
    cache = Cache()
    layer(x, attention_mask=mask, past_key_values=cache, use_cache=True)
    outputs, start = [], 0
    for n in steps:
        mask = torch.cat([mask, torch.ones(len(lengths), n, dtype=torch.long)], dim=1)
        o, _, _ = layer(new[:, start : start + n], attention_mask=mask, past_key_values=cache, use_cache=True)
        outputs.append(o)
        start += n
    decoded = torch.cat(outputs, dim=1)
    for i, n in enumerate(lengths):
        expected, expected_state = alone(layer, torch.cat([prompts[i], new[i]]))
        assert_close(decoded[i], expected[n:])
        assert_states_close(select_rows(state_tensors(cache), i), expected_state)


# Gradients ---------------------------------------------------------------------------------------


@inner_models
@conv_gates
def test_gradcheck_wrt_input(inner_model: str, conv_gate: bool) -> None:
    layer = make_layer(inner_model, conv_gate, hidden_size=8, num_heads=2, mini_batch_size=2)
    x = randn(2, 5, 8, seed=11).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@inner_models
@conv_gates
def test_parameter_gradients_match_reference(inner_model: str, conv_gate: bool) -> None:
    layer = make_layer(inner_model, conv_gate, hidden_size=HIDDEN, mini_batch_size=B)
    x = randn(2, 10, HIDDEN, seed=12)
    weight = randn(2, 10, HIDDEN, seed=13)
    params = [p for _, p in layer.named_parameters()]
    grads = torch.autograd.grad((layer(x)[0] * weight).sum(), params)
    expected = torch.autograd.grad((reference_forward(layer, x, inner_model) * weight).sum(), params)
    for (name, _), g, e in zip(layer.named_parameters(), grads, expected, strict=True):
        err = (g - e).abs().max().item()
        assert err <= 1e-9 * max(1.0, e.abs().max().item()), f"{name}: {err:.3e}"


# Input validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"hidden_size": 10, "num_heads": 3}, ValueError, "num_heads"),
        ({"mini_batch_size": 0}, ValueError, "mini_batch_size"),
        ({"inner_model": "rnn"}, ValueError, "inner_model"),
        ({"colour": "blue"}, TypeError, "colour"),
        ({"head_dim": 0}, ValueError, "head_dim must be an int >= 1"),
        ({"head_dim": 8.0}, TypeError, "head_dim must be an int"),
        ({"head_dim": True}, TypeError, "head_dim must be an int"),
        ({"head_dim": 5}, ValueError, "head_dim must be even with use_rope=True"),
    ],
    ids=[
        "indivisible_heads",
        "mini_batch_0",
        "unknown_inner_model",
        "unknown_keyword",
        "head_dim_0",
        "head_dim_float",
        "head_dim_bool",
        "head_dim_odd_with_rope",
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TTTLayer(**{"hidden_size": 16, "num_heads": 2, **kwargs})


def test_indivisible_hidden_size_names_hidden_size() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        TTTLayer(hidden_size=10, num_heads=3)


@pytest.mark.parametrize(
    "make_input, kwargs, error, match",
    [
        (lambda: randn(4, HIDDEN), {}, ValueError, "hidden_states"),
        (lambda: randn(2, 5, HIDDEN + 1), {}, ValueError, "hidden_size"),
        (lambda: torch.ones(2, 5, HIDDEN, dtype=torch.long), {}, TypeError, "hidden_states"),
        (lambda: randn(2, 0, HIDDEN), {}, ValueError, "seq_len"),
        (lambda: randn(2, 5, HIDDEN), {"attention_mask": torch.ones(2, 4)}, ValueError, "attention_mask"),
        (lambda: randn(2, 5, HIDDEN), {"attention_mask": torch.ones(3, 5)}, ValueError, "attention_mask"),
        (lambda: randn(2, 5, HIDDEN), {"attention_mask": torch.ones(2, 5, 1)}, ValueError, "attention_mask"),
        (
            lambda: randn(2, 5, HIDDEN),
            {"attention_mask": torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 2, 1]])},
            ValueError,
            "attention_mask",
        ),
    ],
    ids=[
        "rank_2",
        "wrong_last_dim",
        "integer_input",
        "empty_sequence",
        "mask_too_short",
        "mask_wrong_batch",
        "mask_rank_3",
        "mask_value_2",
    ],
)
def test_forward_rejects_bad_input(make_input, kwargs: dict, error: type, match: str) -> None:
    layer = make_layer("linear", hidden_size=HIDDEN, mini_batch_size=B)
    with pytest.raises(error, match=match):
        layer(make_input(), **kwargs)


def test_cache_of_mlp_layer_refused_by_linear_layer() -> None:
    mlp = make_layer("mlp", hidden_size=HIDDEN, mini_batch_size=B)
    linear = make_layer("linear", hidden_size=HIDDEN, mini_batch_size=B)
    cache = Cache()
    x = randn(2, 6, HIDDEN, seed=14)
    mlp(x, past_key_values=cache, use_cache=True)
    for n in (1, 3):  # the decode step and the chunked path
        with pytest.raises(ValueError, match="TTT-linear"):
            linear(x[:, :n], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("seq_len", [1, 3], ids=["decode", "chunk"])
def test_cache_with_wrong_batch_size(seq_len: int) -> None:
    layer = make_layer("linear", True, hidden_size=HIDDEN, mini_batch_size=B)
    cache = Cache()
    layer(randn(2, 6, HIDDEN, seed=15), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="cache holds 2 sequences"):
        layer(randn(3, seq_len, HIDDEN, seed=16), past_key_values=cache, use_cache=True)


def test_bad_input_leaves_cache_untouched() -> None:
    layer = make_layer("mlp", True, hidden_size=HIDDEN, mini_batch_size=B)
    x = randn(2, 9, HIDDEN, seed=17)
    cache = Cache()
    layer(x[:, :5], past_key_values=cache, use_cache=True)
    before = [t.clone() for t in state_tensors(cache)]
    with pytest.raises(ValueError):
        layer(x[:, 5:, :-1], past_key_values=cache, use_cache=True)
    assert_states_close(state_tensors(cache), before)
    o, _, _ = layer(x[:, 5:], past_key_values=cache, use_cache=True)
    assert_close(o, layer(x)[0][:, 5:])


def test_head_dim_is_hidden_over_heads() -> None:
    layer = TTTLayer(hidden_size=24, num_heads=3, mini_batch_size=2)
    assert layer.head_dim == 8 and math.isclose(layer.base_lr, 1.0)
    # an own head_dim frees hidden_size from being a multiple of num_heads, as in transformers' attention
    layer = TTTLayer(hidden_size=10, num_heads=3, head_dim=4, mini_batch_size=2)
    assert layer.key_dim == 12 and layer.o_proj.weight.shape == (10, 12)
    # without RoPE an odd head_dim is fine
    assert TTTLayer(hidden_size=16, num_heads=2, head_dim=5, use_rope=False).head_dim == 5
