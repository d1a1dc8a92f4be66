"""JRT-RNN (``ttt_mixer.adapters.mixers.jrt_rnn`` over ``ttt_mixer.ops.taylor_linear_attention``): the
blocked prefix linear attention against its token-by-token reference (float64 outputs and gradients,
float32 within float32 rounding), what the prefix is (non-causal inside, the first real tokens,
closed after prefix_length), exact caching at every split after the prefix and the refusal of one
inside it, padding, the layer against the op on its own projections, models with it (swap, save and
reload, generation with a prefix of several tokens), and bad input."""

from __future__ import annotations

import pytest
import recurrent_mixer_checks as checks
import torch
from conftest import assert_same_model_outputs, perturb_
from fla.models.utils import Cache
from recurrent_mixer_checks import EXACT, GRADIENT_TOLERANCE, max_err, randn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from ttt_mixer.adapters import swap_mixer
from ttt_mixer.adapters.mixers import build_mixer, recurrent_state_size
from ttt_mixer.adapters.mixers.jrt_rnn import JRTRNNMixer
from ttt_mixer.ops.taylor_linear_attention import (
    BLOCK_SIZE,
    PrefixState,
    prefix_taylor_linear_attention,
    prefix_taylor_linear_attention_reference,
    taylor_features,
)

HIDDEN, HEADS, FEATURES, PREFIX = 32, 2, 4, 5
# float32 blocked path against the float64 reference: a few float32 roundings of O(1) outputs
FLOAT32_TOLERANCE = 1e-5


def op_inputs(batch: int, length: int, seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """q, k, v, k_enc, v_enc of ``batch`` sequences of ``length`` tokens, 2 heads, f = 4, dv = 3."""
    shapes = [(FEATURES,), (FEATURES,), (3,), (FEATURES,), (3,)]
    return [
        (randn(batch, length, HEADS, *shape, seed=seed + i) * 0.7).to(dtype) for i, shape in enumerate(shapes)
    ]


def padding_mask() -> torch.Tensor:
    """Three rows of 12: padding at the start, in the middle (inside the prefix), and a row of padding only."""
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, [2, 4, 9]] = False
    mask[2] = False
    return mask


@pytest.mark.parametrize("prefix_length", [1, PREFIX, 12, 40])
def test_the_blocked_path_equals_the_token_by_token_reference(prefix_length: int) -> None:
    """float64, padding anywhere and a row of padding only; a prefix of one token, of several, of the
    whole sequence and beyond it."""
    inputs = op_inputs(3, 12, seed=0)
    mask = padding_mask()
    o, state = prefix_taylor_linear_attention(*inputs, prefix_length, mask)
    expected = prefix_taylor_linear_attention_reference(*inputs, prefix_length, mask)
    assert max_err(o, expected) <= EXACT
    assert o[~mask].abs().max() == 0
    assert state.seen.tolist() == [9, 9, 0]


def test_blocks_beyond_the_first_and_float32() -> None:
    """A sequence longer than a block (the state carries across blocks), in float64 and float32."""
    length = BLOCK_SIZE + 9
    inputs = op_inputs(2, length, seed=1)
    expected = prefix_taylor_linear_attention_reference(*inputs, 20)
    assert max_err(prefix_taylor_linear_attention(*inputs, 20)[0], expected) <= EXACT
    single = [x.float() for x in inputs]
    o32 = prefix_taylor_linear_attention(*single, 20)[0]
    assert o32.dtype == torch.float32 and max_err(o32.double(), expected) <= FLOAT32_TOLERANCE


def test_gradients_equal_the_references() -> None:
    """float64 gradients of every input through the blocked path and through the reference."""
    inputs = [x.requires_grad_() for x in op_inputs(3, 12, seed=2)]
    mask = padding_mask()
    weights = randn(3, 12, HEADS, 3, seed=9)
    blocked = torch.autograd.grad(
        (prefix_taylor_linear_attention(*inputs, PREFIX, mask)[0] * weights).sum(), inputs
    )
    reference = torch.autograd.grad(
        (prefix_taylor_linear_attention_reference(*inputs, PREFIX, mask) * weights).sum(), inputs
    )
    for name, g, g_ref in zip(("q", "k", "v", "k_enc", "v_enc"), blocked, reference, strict=True):
        assert max_err(g, g_ref) <= GRADIENT_TOLERANCE, name


def test_the_prefix_is_read_by_every_query_and_closes_after_prefix_length() -> None:
    """Changing the encoder's input at the prefix's last real token changes the first output; at the
    token after the prefix it changes nothing (the encoder reads only the prefix); padding does not
    count towards the prefix."""
    q, k, v, k_enc, v_enc = op_inputs(1, 10, seed=3)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 1] = False  # the prefix is then tokens 0, 2, 3, 4, 5
    base = prefix_taylor_linear_attention(q, k, v, k_enc, v_enc, PREFIX, mask)[0]
    for position, changes in ((5, True), (6, False)):
        moved = v_enc.clone()
        moved[0, position] += 1
        o = prefix_taylor_linear_attention(q, k, v, k_enc, moved, PREFIX, mask)[0]
        assert (max_err(o[:, :1], base[:, :1]) > 1e-3) is changes, position
    # the decoder stays causal: a change at token 7 leaves the outputs before it
    moved = v.clone()
    moved[0, 7] += 1
    o = prefix_taylor_linear_attention(q, k, moved, k_enc, v_enc, PREFIX, mask)[0]
    assert max_err(o[:, :7], base[:, :7]) == 0 and max_err(o[:, 7:], base[:, 7:]) > 1e-3


def test_the_state_continues_exactly_after_the_prefix_and_refuses_a_split_inside_it() -> None:
    inputs = op_inputs(2, 14, seed=4)
    full, full_state = prefix_taylor_linear_attention(*inputs, PREFIX)
    for split in ([PREFIX, 9], [7, 1, 6], [PREFIX] + [1] * 9):
        state, outputs, start = None, [], 0
        for size in split:
            o, state = prefix_taylor_linear_attention(
                *(x[:, start : start + size] for x in inputs), PREFIX, None, state
            )
            outputs.append(o)
            start += size
        assert max_err(torch.cat(outputs, 1), full) <= EXACT, split
        assert max_err(tuple(state), tuple(full_state)) <= EXACT, split
    _, short_state = prefix_taylor_linear_attention(*(x[:, :3] for x in inputs), PREFIX)
    with pytest.raises(ValueError, match=r"inside its prefix: sequence 0 has 3 of its prefix_length=5"):
        prefix_taylor_linear_attention(*(x[:, 3:4] for x in inputs), PREFIX, None, short_state)
    # a sequence with no real token yet may start in a later call
    empty = PrefixState(short_state.kv * 0, short_state.key_sum * 0, torch.zeros(2, dtype=torch.long))
    o, _ = prefix_taylor_linear_attention(*inputs, PREFIX, None, empty)
    assert max_err(o, full) <= EXACT


def test_taylor_features_give_the_second_order_kernel() -> None:
    """phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(f)."""
    q, k = randn(5, 4, seed=5), randn(5, 4, seed=6)
    s = (q * k).sum(-1) / 2
    assert max_err((taylor_features(q) * taylor_features(k)).sum(-1), 1 + s + s.square() / 2) <= EXACT


def make_mixer(seed: int = 0, **options) -> JRTRNNMixer:
    torch.manual_seed(seed)
    options = {"feature_dim": FEATURES, "prefix_length": PREFIX, **options}
    mixer = build_mixer("jrt_rnn", HIDDEN, HEADS, 0, **options)
    return perturb_(mixer, seed + 1).double().eval()


@pytest.mark.parametrize("conv", [False, True], ids=["plain", "short_conv"])
def test_the_layer_is_the_op_on_its_projections(conv: bool) -> None:
    mixer = make_mixer(use_short_conv=conv, conv_bias=conv)
    x = randn(2, 9, HIDDEN, seed=7)
    pairs = [(mixer.q_proj, "q"), (mixer.k_proj, "k"), (mixer.v_proj, "v")]
    pairs += [(mixer.k_enc_proj, "k_enc"), (mixer.v_enc_proj, "v_enc")]
    with torch.no_grad():
        inputs = []
        for proj, name in pairs:
            y = proj(x)
            if conv:
                # each short convolution is causal: its output on the whole input, then SiLU
                conv_layer = getattr(mixer, f"{name}_conv1d")
                y = torch.nn.functional.conv1d(
                    torch.nn.functional.pad(y.transpose(1, 2), (3, 0)),
                    conv_layer.weight,
                    conv_layer.bias,
                    groups=conv_layer.weight.shape[0],
                )
                y = torch.nn.functional.silu(y.transpose(1, 2))
            inputs.append(y)
        heads = [t.reshape(2, 9, HEADS, -1) for t in inputs]
        o = prefix_taylor_linear_attention_reference(*heads, PREFIX)
        expected = mixer.o_proj(o.reshape(2, 9, HIDDEN))
        assert max_err(mixer(x)[0], expected) <= EXACT


def test_the_layer_caches_exactly_at_every_split_after_the_prefix_and_through_gradients() -> None:
    mixer = make_mixer(use_short_conv=True)
    x = randn(2, 16, HIDDEN, seed=8)
    splits = [[PREFIX, 11], [6, 1, 9], [PREFIX] + [1] * 11, [15, 1]]
    _, entry = checks.assert_cached_splits_match(mixer, x, splits)
    assert entry["recurrent_state"][2].tolist() == [16, 16]
    checks.assert_split_gradients_match(mixer, x, randn(2, 16, HIDDEN, seed=9), split_at=7)


@pytest.mark.parametrize("conv", [False, True], ids=["plain", "short_conv"])
def test_the_layer_skips_padding_and_refuses_a_cached_split_inside_the_prefix(conv: bool) -> None:
    """Padded pieces, one row's prefix in its third piece (its encoder windows start empty there, as
    alone); a continuation inside the prefix is refused."""
    mixer = make_mixer(use_short_conv=conv)
    x = randn(3, 14, HIDDEN, seed=10)
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[0, :2] = 0  # left padding: 6 real tokens in the first piece
    mask[1, [3, 9, 10]] = 0  # inside the prefix, and after it
    mask[2, :9] = 0  # the first two pieces all padding: its prefix is the third
    checks.assert_padding_skipped(mixer, x, mask, [(0, 8), (8, 9), (9, 14)])
    cache = Cache()
    with torch.no_grad():
        mixer(x[:, :3], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="prefix_length=5"):
            mixer(x[:, 3:4], past_key_values=cache, use_cache=True)


def test_a_sequence_shorter_than_the_prefix_is_its_own_prefix() -> None:
    mixer = make_mixer()
    x = randn(1, 3, HIDDEN, seed=11)
    with torch.no_grad():
        projections = [p(x).reshape(1, 3, HEADS, -1) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj)]
        encoder = [p(x).reshape(1, 3, HEADS, -1) for p in (mixer.k_enc_proj, mixer.v_enc_proj)]
        o = prefix_taylor_linear_attention_reference(*projections, *encoder, PREFIX)
        assert max_err(mixer(x)[0], mixer.o_proj(o.reshape(1, 3, HIDDEN))) <= EXACT


def test_the_state_size_and_the_parameters() -> None:
    mixer = make_mixer()
    features = 1 + FEATURES + FEATURES * (FEATURES + 1) // 2
    # S and z per head over the features, and the count of tokens seen
    assert recurrent_state_size(mixer) == HEADS * features * (HIDDEN // HEADS + 1) + 1
    assert sorted(name for name, _ in mixer.named_parameters()) == sorted(
        f"{name}.weight" for name in ("q_proj", "k_proj", "v_proj", "k_enc_proj", "v_enc_proj", "o_proj")
    )


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"prefix_length": 0}, ValueError, "prefix_length must be >= 1"),
        ({"prefix_length": 2.0}, TypeError, "prefix_length must be an int"),
        ({"prefix_length": True}, TypeError, "prefix_length must be an int"),
        ({"prefix_length": 4, "feature_dim": 0}, ValueError, "feature_dim"),
        ({"prefix_length": 4, "eps": -1.0}, ValueError, "eps"),
        ({}, TypeError, "prefix_length"),
    ],
)
def test_bad_options_name_the_parameter(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build_mixer("jrt_rnn", HIDDEN, HEADS, 0, **options)
    with pytest.raises(ValueError, match="divisible"):
        build_mixer("jrt_rnn", HIDDEN, 3, 0, prefix_length=4)


@pytest.mark.parametrize("backbone", ["llama", "mamba"])
def test_a_swapped_model_reloads_and_generates_exactly_with_a_prefix_of_several_tokens(
    backbone: str, tmp_path
) -> None:
    """Every layer JRT-RNN with a 4-token prefix: the saved model reloads to the same logits, and
    greedy decoding with the cache after left-padded prompts of 6 and 4 real tokens gives the tokens
    of recomputing every step without it."""
    torch.manual_seed(0)
    fields = {
        "vocab_size": 40,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "eos_token_id": None,
    }
    if backbone == "llama":
        base = LlamaForCausalLM(LlamaConfig(**fields, intermediate_size=64, num_attention_heads=HEADS))
    else:
        base = MambaForCausalLM(MambaConfig(**fields, state_size=8))
    model = perturb_(swap_mixer(base, "jrt_rnn", "all", prefix_length=4, feature_dim=FEATURES), seed=2).eval()
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        assert_same_model_outputs(
            reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        sequence, sequence_mask = ids, mask
        for _ in range(5):
            logits = model(sequence, attention_mask=sequence_mask, use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], 1)
            sequence_mask = torch.cat([sequence_mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(generated, sequence)
