"""Tests of the adapter mixers (``ttt_mixer.adapters.mixers``) on CPU, float32: each against its
reference (transformers' module, fla's Triton kernel in the interpreter where it runs without a GPU,
else fla's PyTorch reference or the layer's math written out here), exact continuation through fla's
Cache, left padding, gradients and input validation."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_
from fla.layers.based import BasedLinearAttention
from fla.layers.gated_deltanet import GatedDeltaNet
from fla.layers.gla import GatedLinearAttention
from fla.models.utils import Cache
from fla.modules.feature_map import TaylorFeatureMap
from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
from transformers import DynamicCache, LlamaConfig, MambaConfig, MambaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.mamba.modeling_mamba import MambaMixer

from ttt_mixer.adapters import swap_mixer
from ttt_mixer.adapters.mixers import MIXER_NAMES, build_mixer, recurrent_state_size
from ttt_mixer.adapters.mixers.attention import CachedAttention
from ttt_mixer.adapters.mixers.based import BasedMixer
from ttt_mixer.adapters.mixers.gated_deltanet import GatedDeltaNetMixer
from ttt_mixer.adapters.mixers.gla import GLAMixer
from ttt_mixer.adapters.mixers.mamba import MAMBA_CACHE_ARGUMENT, CachedMambaMixer
from ttt_mixer.ops.taylor_linear_attention import taylor_features

TOL = 1e-5  # float32
HIDDEN, HEADS = 32, 4
# the Triton kernels run on CPU tensors only in Triton's interpreter (tests/conftest.py turns it on)
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

# id -> (mixer name, build options): every mixer, and the variants that take other code paths
CASES = {
    "ttt_linear": ("ttt_linear", {"mini_batch_size": 4}),
    "ttt_mlp": ("ttt_mlp", {"mini_batch_size": 4}),
    "attention": ("attention", {"num_key_value_heads": 2}),
    "mamba": ("mamba", {"state_size": 8}),
    "based": ("based", {"feature_dim": 8}),
    "based_conv": ("based", {"feature_dim": 8, "use_short_conv": True, "conv_bias": True}),
    "jrt_rnn": ("jrt_rnn", {"feature_dim": 8, "prefix_length": 1}),
    "jrt_rnn_conv": (
        "jrt_rnn",
        {"feature_dim": 8, "prefix_length": 1, "use_short_conv": True, "conv_bias": True},
    ),
    "gla": ("gla", {}),
    "gla_conv_mqa": (
        "gla",
        {
            "use_short_conv": True,
            "conv_bias": True,
            "num_kv_heads": 2,
            "fuse_norm": False,
            "feature_map": "relu",
        },
    ),
    "gated_deltanet": ("gated_deltanet", {"expand_v": 1}),
    "gated_deltanet_gva": (
        "gated_deltanet",
        {"num_v_heads": 8, "conv_bias": True, "allow_neg_eigval": True, "use_gate": False},
    ),
    "longhorn": ("longhorn", {"d_state": 8}),
    "mamba2": ("mamba2", {"state_size": 8, "n_groups": 2, "chunk_size": 4}),
    "titans": ("titans", {"mini_batch_size": 4}),
    "lact": ("lact", {"mini_batch_size": 4, "window_size": 3}),
}
cases = pytest.mark.parametrize("case", list(CASES))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_mixer(case: str, seed: int = 0) -> torch.nn.Module:
    """The seeded mixer of CASES[case] (layer 0), every parameter perturbed, in eval mode."""
    name, options = CASES[case]
    torch.manual_seed(seed)
    mixer = build_mixer(name, HIDDEN, HEADS, 0, **options)
    return perturb_(mixer, seed + 1).eval()


def run(mixer: torch.nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return mixer(x, **kwargs)[0]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def causal_conv(conv: torch.nn.Conv1d, x: torch.Tensor, activation: bool = True) -> torch.Tensor:
    """x [B, T, D] through a depthwise causal conv (left-padded with zeros), then SiLU."""
    width = conv.weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), conv.weight, conv.bias, groups=x.shape[-1])
    return F.silu(y.transpose(1, 2)) if activation else y.transpose(1, 2)


def rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


# ---------------------------------------------------------------------------------------------------
# (a) each mixer against its reference


def test_attention_matches_llama_attention() -> None:
    """CachedAttention == transformers' eager LlamaAttention with the same weights (GQA, RoPE), on a
    full batch and on a left-padded one with transformers' positions and 4-D mask."""
    config = LlamaConfig(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=2, rope_theta=500.0
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    mixer = perturb_(CachedAttention(config, layer_idx=0), 1).eval()
    reference = LlamaAttention(config, layer_idx=0).eval()
    assert mixer.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(mixer.state_dict())
    rotary = LlamaRotaryEmbedding(config)

    x = randn(2, 12, HIDDEN)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    for attention_mask in (None, mask):
        real = torch.ones(2, 12, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        position_ids = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)
        allowed = torch.ones(12, 12, dtype=torch.bool).tril() & real[:, None, None, :]
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        with torch.no_grad():
            expected, _ = reference(x, rotary(x, position_ids), additive)
        out = run(mixer, x, attention_mask=attention_mask)
        err = max_err(out[real], expected[real])
        assert err <= 1e-6, err
        # positions given explicitly (as a Llama backbone passes them) change nothing
        out_ids = run(mixer, x, attention_mask=attention_mask, position_ids=position_ids)
        assert max_err(out_ids[real], expected[real]) <= 1e-6


def test_mamba_matches_mamba_mixer() -> None:
    """CachedMambaMixer == transformers' MambaMixer with the same weights: one pass, a left-padded
    pass, and prefill + token-by-token decoding with a DynamicCache (outputs and states)."""
    config = MambaConfig(hidden_size=HIDDEN, num_hidden_layers=1, state_size=8, conv_kernel=4)
    torch.manual_seed(0)
    mixer = perturb_(CachedMambaMixer(config, 0), 1).eval()
    reference = MambaMixer(config, 0).eval()
    assert mixer.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(mixer.state_dict())

    x = randn(2, 12, HIDDEN)
    with torch.no_grad():
        expected = reference(x)
    assert max_err(run(mixer, x), expected) <= TOL

    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        expected_padded = reference(x, attention_mask=mask)
    real = mask.bool()
    assert max_err(run(mixer, x, attention_mask=mask)[real], expected_padded[real]) <= TOL

    hf_cache, cache = DynamicCache(config=config), Cache()
    with torch.no_grad():
        hf_out = [reference(x[:, :8], **{MAMBA_CACHE_ARGUMENT: hf_cache})]
        hf_out += [reference(x[:, t : t + 1], **{MAMBA_CACHE_ARGUMENT: hf_cache}) for t in range(8, 12)]
    out = [run(mixer, x[:, :8], past_key_values=cache, use_cache=True)]
    out += [run(mixer, x[:, t : t + 1], past_key_values=cache, use_cache=True) for t in range(8, 12)]
    assert max_err(torch.cat(out, 1), torch.cat(hf_out, 1)) <= TOL
    assert max_err(torch.cat(out, 1), expected) <= TOL
    assert max_err(cache[0]["conv_state"], hf_cache.layers[0].conv_states[0]) <= TOL
    assert max_err(cache[0]["recurrent_state"], hf_cache.layers[0].recurrent_states[0]) <= TOL


@pytest.mark.filterwarnings("ignore::UserWarning")  # fla's feature map checkpoints without use_reentrant
def test_based_matches_fla() -> None:
    """BasedMixer == fla's forward_reference (with the kernel's eps) and fla's own Triton forward
    (parallel_based, in the interpreter on CPU); its Taylor features are fla's TaylorFeatureMap."""
    mixer = make_mixer("based")
    x = randn(2, 20, HIDDEN)
    feature_input = randn(3, 5, 8, seed=1)
    assert max_err(taylor_features(feature_input), TaylorFeatureMap(8)(feature_input)) <= 1e-6

    out = run(mixer, x)
    reference = copy.deepcopy(mixer)
    # fla's parallel kernel normalises with + 1e-6 (forward_reference with its eps, 1e-12 by default)
    reference.eps = mixer.kernel_eps
    with torch.no_grad():
        expected = BasedLinearAttention.forward_reference(reference, x)
    assert max_err(out, expected) <= TOL
    if INTERPRETER or x.is_cuda:
        with torch.no_grad():
            triton_out = BasedLinearAttention.forward(mixer, x)
        assert max_err(out, triton_out) <= TOL
        mixer.backend = "triton"  # the stateless pass goes to fla's kernel
        assert max_err(run(mixer, x), triton_out) == 0


def test_based_short_conv_matches_written_out_math() -> None:
    """BasedMixer with ``use_short_conv`` == in float64: q, k, v through their causal convolutions
    and SiLU, then o_t = sum_{s<=t} w_ts v_s / (sum_{s<=t} w_ts + eps) with w_ts = 1 + a + a^2 / 2,
    a = q_t.k_s / sqrt(f); its conv windows are the projections' last conv_size inputs."""
    mixer = make_mixer("based_conv")
    m = copy.deepcopy(mixer).double()
    x = randn(2, 14, HIDDEN).double()
    q, k, v = (
        causal_conv(conv, proj(x)).unflatten(-1, (m.num_heads, -1))
        for conv, proj in ((m.q_conv1d, m.q_proj), (m.k_conv1d, m.k_proj), (m.v_conv1d, m.v_proj))
    )
    a = torch.einsum("bthf,bshf->bhts", q, k) / math.sqrt(m.head_k_dim)
    weights = (1 + a + a.square() / 2).tril()
    o = torch.einsum("bhts,bshd->bthd", weights, v) / (
        weights.sum(-1).transpose(1, 2)[..., None] + m.kernel_eps
    )
    expected = m.o_proj(o.flatten(-2))

    cache = Cache()
    out = run(mixer, x.float(), past_key_values=cache, use_cache=True)
    assert max_err(out, expected) <= TOL
    windows = cache[0]["conv_state"]
    assert windows[2].shape == (2, HIDDEN, 4)
    assert max_err(windows[2], mixer.v_proj(x.float())[:, -4:].transpose(1, 2)) <= 1e-6
    if INTERPRETER or x.is_cuda:
        mixer.backend = "triton"  # the stateless pass: the convolutions, then fla's parallel_based
        assert max_err(run(mixer, x.float()), expected) <= TOL


def gla_reference(mixer: GLAMixer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's GatedLinearAttention.forward written out in float64 (no padding, no cache): short convs,
    the gates, the recurrence S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(K),
    the gated RMSNorm. Returns (o, final state [B, H, K, V])."""
    m = copy.deepcopy(mixer).double()
    x = x.double()
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    if m.use_short_conv:
        q, k, v = causal_conv(m.q_conv1d, q), causal_conv(m.k_conv1d, k), causal_conv(m.v_conv1d, v)
    gk = F.logsigmoid(m.gk_proj(x)) / m.gate_logit_normalizer
    q = q.unflatten(-1, (m.num_heads, m.head_k_dim))
    k, gk = (
        t.unflatten(-1, (m.num_kv_heads, m.head_k_dim)).repeat_interleave(m.num_kv_groups, 2) for t in (k, gk)
    )
    v = v.unflatten(-1, (m.num_kv_heads, m.head_v_dim)).repeat_interleave(m.num_kv_groups, 2)
    if m.feature_map_name == "relu":
        q, k = F.relu(q), F.relu(k)
    state = x.new_zeros(x.shape[0], m.num_heads, m.head_k_dim, m.head_v_dim)
    outputs = []
    for t in range(x.shape[1]):
        state = state * gk[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * m.head_k_dim**-0.5, state))
    o = torch.stack(outputs, 1)
    g = m.g_proj(x)
    if m.fuse_norm_and_gate:
        o = rms(o, m.g_norm_swish_gate.weight, m.g_norm_swish_gate.eps) * F.silu(
            g.unflatten(-1, o.shape[-2:])
        )
        o = o.flatten(-2)
    else:
        o = rms(o, m.g_norm.weight, m.g_norm.eps).flatten(-2) * F.silu(g)
    return m.o_proj(o), state


@pytest.mark.parametrize("case", ["gla", "gla_conv_mqa"])
def test_gla_matches_fla_math(case: str) -> None:
    """GLAMixer == fla's GatedLinearAttention.forward written out here (fla's GLA kernels are
    autotuned and cannot run in the interpreter without a GPU); its state has fla's state_v_first
    layout [B, H, V, K] and its conv states fla's [B, D, W]."""
    mixer = make_mixer(case)
    assert mixer.state_dict().keys() == GatedLinearAttention.state_dict(mixer).keys()
    x = randn(2, 14, HIDDEN)
    expected, expected_state = gla_reference(mixer, x)
    cache = Cache()
    out = run(mixer, x, past_key_values=cache, use_cache=True)
    assert max_err(out, expected) <= TOL
    assert max_err(cache[0]["recurrent_state"], expected_state.transpose(-1, -2)) <= TOL
    if mixer.use_short_conv:
        conv_q = cache[0]["conv_state"][0]
        assert conv_q.shape == (2, mixer.key_dim, mixer.conv_size)
        assert max_err(conv_q, mixer.q_proj(x)[:, -mixer.conv_size :].transpose(1, 2)) <= 1e-6


def gdn_reference(
    mixer: GatedDeltaNetMixer,
    x: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's GatedDeltaNet.forward from fla's own recurrent Triton kernel (in the interpreter on CPU),
    which normalises q and k, computes the gate and beta and keeps the state [B, HV, V, K]: the
    outputs and final state of tokens ``start:`` continuing from ``initial_state``."""
    m = mixer
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    if m.use_short_conv:
        q, k, v = causal_conv(m.q_conv1d, q), causal_conv(m.k_conv1d, k), causal_conv(m.v_conv1d, v)
    else:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    q, k = (t[:, start:].unflatten(-1, (m.num_heads, m.head_k_dim)) for t in (q, k))
    v = v[:, start:].unflatten(-1, (m.num_v_heads, m.head_v_dim))
    o, state = fused_recurrent_gated_delta_rule(
        q=q,
        k=k,
        v=v,
        g=m.a_proj(x)[:, start:],
        beta=m.b_proj(x)[:, start:],
        initial_state=initial_state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        A_log=m.A_log,
        dt_bias=m.dt_bias,
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=m.allow_neg_eigval,
        state_v_first=True,
    )
    if m.use_gate:
        o = rms(o, m.o_norm.weight, m.o_norm.eps) * F.silu(m.g_proj(x)[:, start:].unflatten(-1, o.shape[-2:]))
    else:
        o = rms(o, m.o_norm.weight, m.o_norm.eps)
    return m.o_proj(o.flatten(-2)), state


@pytest.mark.skipif(not INTERPRETER, reason="fla's kernel needs a GPU or Triton's interpreter")
@pytest.mark.parametrize("case", ["gated_deltanet", "gated_deltanet_gva"])
def test_gated_deltanet_matches_fla_kernel(case: str) -> None:
    """GatedDeltaNetMixer == fla's layer math around fla's fused recurrent kernel: outputs and final
    state (layout [B, HV, V, K]) of a prefill, and of a continuation from that state."""
    mixer = make_mixer(case)
    x = randn(2, 14, HIDDEN)
    cache = Cache()
    with torch.no_grad():
        out = run(mixer, x[:, :9], past_key_values=cache, use_cache=True)
        state = cache[0]["recurrent_state"].clone()
        expected, expected_state = gdn_reference(mixer, x[:, :9])
        assert max_err(out, expected) <= TOL
        assert state.shape == expected_state.shape
        assert max_err(state, expected_state) <= TOL
        out = run(mixer, x[:, 9:], past_key_values=cache, use_cache=True)
        expected, expected_state = gdn_reference(mixer, x, initial_state=state, start=9)
    assert max_err(out, expected) <= TOL
    assert max_err(cache[0]["recurrent_state"], expected_state) <= TOL


# ---------------------------------------------------------------------------------------------------
# (b) exact caching, (c) padding


@cases
def test_continuation_equals_one_pass(case: str) -> None:
    """Prefill + continuations (split at several points, chunks of several tokens) and token-by-token
    decoding give the one-pass outputs; the cached states match too."""
    mixer = make_mixer(case)
    x = randn(2, 16, HIDDEN, seed=1)
    full_cache = Cache()
    full = run(mixer, x, past_key_values=full_cache, use_cache=True)
    assert max_err(full, run(mixer, x)) <= TOL
    for chunks in ([1, 15], [7, 9], [15, 1], [5, 1, 4, 1, 5], [1] * 16):
        cache, outputs, start = Cache(), [], 0
        for size in chunks:
            outputs.append(run(mixer, x[:, start : start + size], past_key_values=cache, use_cache=True))
            start += size
        err = max_err(torch.cat(outputs, 1), full)
        assert err <= TOL, (chunks, err)
        for key in ("recurrent_state", "conv_state", "attn_state"):
            expected, got = full_cache[0][key], cache[0][key]
            expected = expected if isinstance(expected, (tuple, list)) else [expected]
            got = got if isinstance(got, (tuple, list)) else [got]
            for a, b in zip(expected, got, strict=True):
                assert (a is None and b is None) or max_err(a, b) <= TOL, (key, chunks)


@cases
def test_left_padding_equals_each_sequence_alone(case: str) -> None:
    """A left-padded batch (one sequence shorter than a conv window, one of padding only) gives each
    sequence's own outputs at its real tokens and 0 at padding, in a prefill and in decoding steps
    after it (the mask then covering the cache too, as generate passes it; the empty row's first
    token is its first step)."""
    mixer = make_mixer(case)
    lengths, total, steps = (14, 9, 2, 0), 14, 3
    rows = len(lengths)
    x = randn(rows, total + steps, HIDDEN, seed=2)
    mask = torch.zeros(rows, total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, total - length :] = 1

    cache = Cache()
    outputs = [run(mixer, x[:, :total], attention_mask=mask, past_key_values=cache, use_cache=True)]
    for step in range(steps):
        full_mask = torch.cat([mask, torch.ones(rows, step + 1, dtype=torch.long)], 1)
        token = x[:, total + step : total + step + 1]
        outputs.append(run(mixer, token, attention_mask=full_mask, past_key_values=cache, use_cache=True))
    padded = torch.cat(outputs, 1)
    assert padded[:, :total][~mask.bool()].abs().max() == 0
    for row, length in enumerate(lengths):
        alone_cache = Cache()
        prompt = x[row : row + 1, total - length : total]
        alone = [run(mixer, prompt, past_key_values=alone_cache, use_cache=True)] if length else []
        for step in range(steps):
            token = x[row : row + 1, total + step : total + step + 1]
            alone.append(run(mixer, token, past_key_values=alone_cache, use_cache=True))
        err = max_err(padded[row, total - length :], torch.cat(alone, 1)[0])
        assert err <= TOL, (row, err)


@pytest.mark.parametrize("case", [case for case in CASES if CASES[case][0] != "mamba"])
def test_padding_anywhere_is_skipped(case: str) -> None:
    """As fla's layers unpad: padding in the middle or at the end of a chunk, even right after cached
    tokens, gives the outputs of the sequence without its padding tokens (Mamba pads as transformers
    does, exact only for left padding)."""
    mixer = make_mixer(case)
    x = randn(3, 12, HIDDEN, seed=5)
    chunks = [(0, 5), (5, 10), (10, 12)]
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, [1, 2, 5, 6, 7, 9]] = 0  # pads mid-chunk, opening a chunk after the cache, ending one
    mask[1, [3, 4]] = 0
    mask[2, [0, 1, 2, 3, 4, 7]] = 0  # a first chunk of padding only
    cache, outputs = Cache(), []
    for start, end in chunks:
        kwargs = {"attention_mask": mask[:, :end], "past_key_values": cache, "use_cache": True}
        outputs.append(run(mixer, x[:, start:end], **kwargs))
    padded = torch.cat(outputs, 1)
    for row in range(3):
        real = mask[row].bool()
        alone = run(mixer, x[row : row + 1, real])[0]
        err = max_err(padded[row, real], alone)
        assert err <= TOL, (row, err)
        assert padded[row, ~real].abs().max() == 0


# ---------------------------------------------------------------------------------------------------
# (d) gradients


@cases
def test_backward_gives_finite_gradients(case: str) -> None:
    """Training mode, a left-padded batch with a row of padding only: every parameter and the input
    get finite gradients; and, but for Mamba (whose cached one-token steps update states in place),
    through a cached continuation of several tokens."""
    mixer = make_mixer(case).train()
    x = randn(3, 10, HIDDEN, seed=3).requires_grad_()
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[2] = 0
    out = mixer(x, attention_mask=mask)[0]
    (out * randn(*out.shape, seed=4)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, parameter in mixer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name

    if CASES[case][0] == "mamba":
        return
    mixer.zero_grad()
    cache = Cache()
    first = mixer(x[:, :6], past_key_values=cache, use_cache=True)[0]
    second = mixer(x[:, 6:], past_key_values=cache, use_cache=True)[0]
    torch.cat([first, second], 1).square().sum().backward()
    for name, parameter in mixer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


# ---------------------------------------------------------------------------------------------------
# (e) bad input


@cases
def test_bad_inputs_raise(case: str) -> None:
    mixer = make_mixer(case)
    x = randn(2, 6, HIDDEN)
    with pytest.raises(ValueError, match="hidden_states"):
        mixer(x[0])
    with pytest.raises(ValueError, match="hidden_size"):
        mixer(x[..., :-1])
    with pytest.raises(
        ValueError, match=r"hidden_states must hold at least one sequence \(batch_size >= 1\)"
    ):
        mixer(x[:0])
    for bad_mask in (torch.ones(2, 5), torch.ones(2, 6, 6), torch.ones(3, 6), torch.full((2, 6), 2)):
        with pytest.raises(ValueError, match="attention_mask"):
            mixer(x, attention_mask=bad_mask)
    if CASES[case][0] not in ("ttt_linear", "ttt_mlp", "titans", "lact"):  # TTT layers run packed sequences
        with pytest.raises(ValueError, match="cu_seqlens"):
            mixer(x[:1], cu_seqlens=torch.tensor([0, 3, 6]))
    else:
        with pytest.raises(TypeError, match="cu_seqlens must be a 1-D integer tensor"):
            mixer(x[:1], cu_seqlens=torch.tensor([0, 3, 6]).bool())
    cache = Cache()
    run(mixer, x, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="sequences"):
        mixer(randn(3, 1, HIDDEN), past_key_values=cache, use_cache=True)


def test_build_mixer_errors_and_configs() -> None:
    with pytest.raises(ValueError, match="unknown mixer") as error:
        build_mixer("transformer", HIDDEN, HEADS, 0)
    assert all(name in str(error.value) for name in MIXER_NAMES)
    for name in MIXER_NAMES:
        with pytest.raises(TypeError, match=f"mixer '{name}'"):
            build_mixer(name, HIDDEN, HEADS, 0, not_an_option=1)
    for name, options in [
        ("gla", {"mode": "fused_chunk"}),  # its state layout differs from the other modes'
        ("gla", {"expand_k": 0.3}),  # fla's assert, as a ValueError
        ("gla", {"backend": "cuda"}),
        ("based", {"causal": False}),
        ("gla", {"gate_fn": "tanh"}),
    ]:
        with pytest.raises(ValueError):
            build_mixer(name, HIDDEN, HEADS, 0, **options)
    llama = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=1)
    with pytest.raises(ValueError, match="LlamaConfig"):
        build_mixer("attention", 2 * HIDDEN, HEADS, 0, llama)
    assert build_mixer("attention", HIDDEN, HEADS, 1, llama).config is llama
    rope = build_mixer("attention", HIDDEN, HEADS, 1, llama, rope_theta=100.0)
    assert rope.num_key_value_groups == HEADS and rope.config.rope_parameters["rope_theta"] == 100.0
    mamba = MambaConfig(hidden_size=HIDDEN, num_hidden_layers=3, state_size=4)
    assert build_mixer("mamba", HIDDEN, HEADS, 2, mamba).config is mamba
    with pytest.raises(ValueError, match="layer_idx"):
        build_mixer("mamba", HIDDEN, HEADS, 3, mamba)
    # another backbone's config: the mixer gets its own
    assert build_mixer("mamba", HIDDEN, HEADS, 5, llama, conv_kernel=2).conv_kernel_size == 2
    assert isinstance(build_mixer("gated_deltanet", HIDDEN, HEADS, 0), GatedDeltaNet)
    assert isinstance(build_mixer("based", HIDDEN, HEADS, 0), BasedMixer)


def test_mamba_A_init_and_D_init() -> None:
    """``A_init`` starts every A at -A_init and ``D_init`` every D at D_init, in the mixer alone and in
    a model (whose init runs the mixer's again after the backbone's); without them A is
    transformers' S4D-real -(1, ..., N) and D is 1. Bad values name the option."""
    alone = build_mixer("mamba", HIDDEN, HEADS, 0, A_init=1.0, D_init=0.0, state_size=4)
    assert torch.equal(alone.A_log, torch.zeros(2 * HIDDEN, 4))
    assert torch.equal(alone.D, torch.zeros(2 * HIDDEN))
    torch.manual_seed(0)
    base = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=2, state_size=4))
    for options, A, D in [
        ({"A_init": 2.0, "D_init": -0.5}, torch.full((4,), 2.0), -0.5),
        ({}, torch.arange(1.0, 5.0), 1.0),
    ]:
        mixers = [
            m for m in swap_mixer(base, "mamba", **options).modules() if isinstance(m, CachedMambaMixer)
        ]
        assert len(mixers) == 2
        for mixer in mixers:
            assert torch.allclose(mixer.A_log.exp(), A.expand(2 * HIDDEN, -1))
            assert torch.equal(mixer.D, torch.full((2 * HIDDEN,), D))
    for name, value, error in [
        ("A_init", 0.0, ValueError),
        ("A_init", -1.0, ValueError),
        ("A_init", "1", TypeError),
        ("A_init", True, TypeError),
        ("D_init", math.nan, ValueError),
        ("D_init", "0", TypeError),
    ]:
        with pytest.raises(error, match=name):
            build_mixer("mamba", HIDDEN, HEADS, 0, **{name: value})


def test_recurrent_state_size() -> None:
    d = HIDDEN // HEADS
    sizes = {
        "ttt_linear": 1 + 2 * HEADS * (d + 1) * d,  # position, inner weights and their accumulators
        "attention": None,
        "mamba": 2 * HIDDEN * (4 + 8),  # conv window and SSM state of the 2x wide inner channels
        "based": HEADS * (1 + 8 + 36) * (d + 1),  # S and z over 1 + f + f(f+1)/2 features
        "jrt_rnn": HEADS * (1 + 8 + 36) * (d + 1) + 1,  # S and z as Based's, and the tokens seen
        "gla": HEADS * (HIDDEN // 2 // HEADS) * d,
        "gla_conv_mqa": HEADS * (HIDDEN // 2 // HEADS) * d + 4 * (HIDDEN // 2 + HIDDEN // 4 + HIDDEN // 2),
        "gated_deltanet": HEADS * d * d + 4 * 3 * HIDDEN,
    }
    for case, size in sizes.items():
        assert recurrent_state_size(make_mixer(case)) == size, case
    # measuring runs the mixer at layer_idx 0 in eval mode, then restores both
    mixer = make_mixer("gla")
    mixer.train()
    mixer.layer_idx = 3
    recurrent_state_size(mixer)
    assert mixer.training and mixer.layer_idx == 3


def test_mixer_classes_keep_parent_names() -> None:
    """The fla mixers are fla's layers (same parameter names) and run on CPU without Triton."""
    assert isinstance(make_mixer("gla"), GatedLinearAttention)
    assert isinstance(make_mixer("based"), BasedLinearAttention)
    assert math.isclose(make_mixer("based").kernel_eps, 1e-6)
