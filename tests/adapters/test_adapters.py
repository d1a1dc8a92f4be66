"""Tests of ``swap_mixer`` and the mixer backbones: every mixer swapped into Llama and Mamba, all
layers and hybrid; forward, loss and backward; greedy generation with the cache equals recomputation
without it (also left-padded); save -> reload in a fresh process; ``init="attention"``; bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MIXER_OPTIONS, greedy_without_cache, perturb_, subprocess_env
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ttt_mixer.adapters import (
    MIXER_NAMES,
    MixerLlamaConfig,
    MixerLlamaForCausalLM,
    MixerMambaConfig,
    MixerMambaForCausalLM,
    parse_layers,
    swap_mixer,
)
from ttt_mixer.adapters.swap import mixer_path, rope_half_to_interleaved

VOCAB = 40


def tiny_attention_model(model_class: type, config_class: type, seed: int, **fields: Any) -> PreTrainedModel:
    """A seeded 4-head, width-32 model of a Llama-like family; ``fields`` add to or override its config."""
    torch.manual_seed(seed)
    defaults = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": None,
    }
    return model_class(config_class(**(defaults | fields))).eval()


def tiny_llama(num_layers: int = 2, kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    return tiny_attention_model(
        LlamaForCausalLM, LlamaConfig, seed, num_hidden_layers=num_layers, num_key_value_heads=kv_heads
    )


def tiny_mistral(sliding_window: int | None = None, seed: int = 0) -> MistralForCausalLM:
    return tiny_attention_model(
        MistralForCausalLM, MistralConfig, seed, max_position_embeddings=64, sliding_window=sliding_window
    )


def tiny_qwen2(sliding_window: int | None = None, seed: int = 0) -> Qwen2ForCausalLM:
    """A Qwen2 model (biases on q/k/v, none on o); a window given turns its sliding window on."""
    return tiny_attention_model(
        Qwen2ForCausalLM,
        Qwen2Config,
        seed,
        max_position_embeddings=64,
        use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window,
        max_window_layers=0,
    )


def tiny_mamba(num_layers: int = 2, seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=num_layers,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    return MambaForCausalLM(config).eval()


def random_ids(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def swap(model, mixer: str, layers="all", **kwargs):
    torch.manual_seed(1)
    return swap_mixer(model, mixer, layers, **kwargs, **TINY_MIXER_OPTIONS.get(mixer, {})).eval()


def hybrid(base, mixers: list[str]):
    """Layer i of ``base`` swapped to ``mixers[i]``, perturbed so that no weight is at its init."""
    model = base
    for i, mixer in enumerate(mixers):
        model = swap(model, mixer, [i])
    return perturb_(model, seed=5, scale=0.05).eval()


@pytest.mark.parametrize("backbone", ["llama", "mamba"])
@pytest.mark.parametrize("mixer", MIXER_NAMES)
@pytest.mark.parametrize("layers", ["all", [1]])
def test_swap_forward_loss_backward(backbone: str, mixer: str, layers) -> None:
    base = tiny_llama() if backbone == "llama" else tiny_mamba()
    model = swap(base, mixer, layers).train()
    expected_class = MixerLlamaForCausalLM if backbone == "llama" else MixerMambaForCausalLM
    assert isinstance(model, expected_class)
    default = "attention" if backbone == "llama" else "mamba"
    assert model.config.mixers == ([mixer, mixer] if layers == "all" else [default, mixer])
    ids = random_ids(2, 11)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 11, VOCAB)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    swapped = model.get_submodule(
        "model.layers.1.self_attn" if backbone == "llama" else "backbone.layers.1.mixer"
    )
    grads = [p.grad for p in swapped.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("backbone", ["llama", "mamba"])
def test_layers_not_named_keep_their_weights(backbone: str) -> None:
    base = tiny_llama(3) if backbone == "llama" else tiny_mamba(3)
    model = swap(base, "ttt_linear", "every:2")
    assert parse_layers("every:2", 3) == [1]
    prefix = "model.layers.1." if backbone == "llama" else "backbone.layers.1."
    old, new = base.state_dict(), model.state_dict()
    for key, value in old.items():
        if not key.startswith(prefix + ("self_attn" if backbone == "llama" else "mixer")):
            assert torch.equal(new[key], value), key


def test_attention_swapped_for_itself_reproduces_llama() -> None:
    """With every layer's attention copied, the mixer backbone computes exactly what Llama does."""
    base = perturb_(tiny_llama(), seed=2, scale=0.05).eval()
    model = swap(base, "attention", init="attention")
    ids = random_ids(2, 13)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)
        real = mask.bool()
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits[real],
            base(ids, attention_mask=mask).logits[real],
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize(
    "make_base",
    [lambda: tiny_mistral(None), lambda: tiny_mistral(64), tiny_qwen2],
    ids=["mistral", "mistral-window-never-binds", "qwen2"],
)
def test_full_attention_mistral_and_qwen2_swap_like_llama(make_base, tmp_path: Path) -> None:
    """Mistral and Qwen2 models whose window never binds are Llama models (Qwen2 with q/k/v biases):
    swapped for itself each gives the same logits (also left-padded), saves and reloads, and TTT swaps
    in."""
    base = perturb_(make_base(), seed=3, scale=0.05).eval()
    same = swap(base, "attention", init="attention")
    assert not hasattr(same.config, "sliding_window")
    ids = random_ids(2, 13)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    real = mask.bool()
    same.save_pretrained(tmp_path)
    reloaded = MixerLlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(same(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            same(ids, attention_mask=mask).logits[real],
            base(ids, attention_mask=mask).logits[real],
            atol=1e-5,
            rtol=1e-5,
        )
        assert torch.equal(reloaded(ids).logits, same(ids).logits)
        # a TTT hybrid keeps layer 0 as it was, then differs, and decodes exactly with its cache
        hybrid_model = swap(base, "ttt_linear", [1])
        hybrid_out = hybrid_model(ids, output_hidden_states=True)
        base_out = base(ids, output_hidden_states=True)
        torch.testing.assert_close(
            hybrid_out.hidden_states[1], base_out.hidden_states[1], atol=1e-5, rtol=1e-5
        )
        assert not torch.allclose(hybrid_out.logits, base_out.logits, atol=1e-3)
        generated = hybrid_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, greedy_without_cache(hybrid_model, ids, 4, mask))


# fields that published or GGUF-loaded checkpoints carry beyond their transformers config's own
CHECKPOINT_FIELDS = {
    "llama": {
        "is_llama_config": True,
        "rope_interleaved": False,
        "_model_name_or_path": "SmolLM2",
        "unk_token_id": 0,
    },
    "mamba": {"n_layer": 2, "d_model": 32, "fused_add_norm": True, "rms_norm": True, "ssm_cfg": {}},
}
GGUF_QUANTIZATION = {"quant_method": "gguf", "gguf_file": "model.gguf", "dequantize": False}


@pytest.mark.parametrize("backbone", ["llama", "mamba"])
def test_checkpoint_fields_are_kept_through_swap_save_and_reload(backbone: str, tmp_path: Path) -> None:
    """A checkpoint's own config fields stay in the swapped config, its saved config.json and the
    reloaded config; a GGUF load's quantization_config does not (its weights are dequantised), so the
    reloaded model gets no quantizer and can be saved again."""
    base = tiny_llama() if backbone == "llama" else tiny_mamba()
    base.config.update(CHECKPOINT_FIELDS[backbone] | {"quantization_config": GGUF_QUANTIZATION})
    model = swap(base, "ttt_linear", [1])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    model_class = MixerLlamaForCausalLM if backbone == "llama" else MixerMambaForCausalLM
    reloaded = model_class.from_pretrained(tmp_path)
    for name, value in CHECKPOINT_FIELDS[backbone].items():
        assert getattr(model.config, name) == saved[name] == getattr(reloaded.config, name) == value, name
    assert "quantization_config" not in saved
    assert getattr(reloaded, "hf_quantizer", None) is None
    reloaded.save_pretrained(tmp_path / "again")


@pytest.mark.parametrize(
    ("config_class", "field", "meant"),
    [
        (MixerLlamaConfig, "mixer", "mixers"),
        (MixerLlamaConfig, "mixer_option", "mixer_options"),
        (MixerLlamaConfig, "qkvbias", "qkv_bias"),
        (MixerMambaConfig, "num_head", "num_heads"),
        (MixerMambaConfig, "mixers_options", "mixer_options"),
    ],
)
def test_misspelt_own_fields_are_refused(config_class: type, field: str, meant: str) -> None:
    """Our own fields are what a user types: a near-miss of one is a TypeError naming it, while a
    field unlike any of ours is kept as transformers keeps it."""
    with pytest.raises(TypeError, match=f"'{field}' \\(did you mean '{meant}'\\?\\)"):
        config_class(**{field: 1})
    assert config_class(unrelated_checkpoint_field=1).to_dict()["unrelated_checkpoint_field"] == 1


def test_mamba_layers_reproduce_mamba() -> None:
    base = perturb_(tiny_mamba(2), seed=2, scale=0.05).eval()
    model = swap(base, "attention", [1])
    ids = random_ids(2, 13)
    with torch.no_grad():
        # transformers' Mamba lists the output of each layer; ours lists the embeddings first, as Llama does
        expected = base(ids, output_hidden_states=True).hidden_states[0]
        actual = model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("backbone", "mixer", "options"),
    [
        ("llama", "mamba", {}),
        ("llama", "mamba2", {}),
        ("mamba", "mamba2", {}),
        # in a Mamba backbone transformers' Mamba mixer reads the backbone's config unless given its own
        ("mamba", "mamba", {"initializer_range": 0.1}),
    ],
)
def test_transformers_mamba_mixers_are_initialised_as_transformers_does_in_either_backbone(
    backbone: str, mixer: str, options: dict[str, Any]
) -> None:
    """In a backbone initialised N(0, 0.02): the mixer's Linear layers N(0, 0.1) (its config's
    range), Kaiming-uniform out_proj, the S4D A = -(1, 2, ...) and dt = softplus(bias) within the
    config's [time_step_min, time_step_max]."""
    torch.manual_seed(0)
    sizes = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "initializer_range": 0.02}
    if backbone == "llama":
        base = LlamaForCausalLM(LlamaConfig(**sizes, intermediate_size=64, num_attention_heads=4))
    else:
        base = MambaForCausalLM(MambaConfig(**sizes, state_size=8))
    model = swap_mixer(base, mixer, "all", **options)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    for layer in range(2):
        module = model.get_submodule(mixer_path(model).format(layer))
        assert module.config.initializer_range == 0.1
        assert module.in_proj.weight.std().item() == pytest.approx(0.1, rel=0.1)
        bound = module.out_proj.weight.shape[1] ** -0.5  # Kaiming uniform with a = sqrt(5)
        assert module.out_proj.weight.abs().max().item() <= bound
        assert module.out_proj.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
        if mixer == "mamba":
            A, dt = torch.exp(module.A_log), F.softplus(module.dt_proj.bias)
            torch.testing.assert_close(A, torch.arange(1.0, A.shape[1] + 1).expand_as(A))
        else:
            A, dt = torch.exp(module.A_log), F.softplus(module.dt_bias)
            torch.testing.assert_close(A, torch.arange(1.0, A.shape[0] + 1))
        assert module.config.time_step_min <= dt.min() and dt.max() <= module.config.time_step_max * 1.001


LLAMA_HYBRID = ["attention", "ttt_linear", "mamba", "gla", "based", "gated_deltanet", "ttt_mlp"]
MAMBA_HYBRID = ["mamba", "attention", "ttt_linear", "gated_deltanet"]


@pytest.mark.parametrize("backbone", ["llama", "mamba"])
def test_hybrid_greedy_and_beam_generation_with_cache_equal_recomputation(backbone: str) -> None:
    if backbone == "llama":
        model = hybrid(tiny_llama(len(LLAMA_HYBRID)), LLAMA_HYBRID)
    else:
        model = hybrid(tiny_mamba(len(MAMBA_HYBRID)), MAMBA_HYBRID)
    ids = random_ids(2, 9, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ids[0, :3] = 0
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
        expected = greedy_without_cache(model, ids, 7, mask)
        assert torch.equal(generated, expected)
        # each left-padded sequence continues as it does alone
        alone = model.generate(ids[:1, 3:], max_new_tokens=7, do_sample=False)
        assert torch.equal(generated[0, 3:], alone[0])
        # beam search reorders every mixer's state in the cache
        beams = {
            use_cache: model.generate(
                ids[1:], max_new_tokens=5, num_beams=3, do_sample=False, use_cache=use_cache
            )
            for use_cache in (True, False)
        }
        assert torch.equal(beams[True], beams[False])


@pytest.mark.slow
def test_save_and_reload_in_fresh_process(tmp_path: Path) -> None:
    models = {
        "llama": hybrid(tiny_llama(len(LLAMA_HYBRID)), LLAMA_HYBRID),
        "mamba": hybrid(tiny_mamba(len(MAMBA_HYBRID)), MAMBA_HYBRID),
    }
    ids = random_ids(2, 10, seed=8)
    torch.save(ids, tmp_path / "ids.pt")
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["mixers"] == model.config.mixers
        assert config["auto_map"]["AutoModelForCausalLM"].startswith("ttt_mixer_remote.Mixer")
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'ttt_mixer' not in sys.modules\n"
        "folder = sys.argv[1]\n"
        "ids = torch.load(folder + '/ids.pt')\n"
        "for name in ('llama', 'mamba'):\n"
        "    model = AutoModelForCausalLM.from_pretrained(f'{folder}/{name}', trust_remote_code=True).eval()\n"
        "    with torch.no_grad():\n"
        "        torch.save(model(ids).logits, f'{folder}/{name}.pt')\n"
    )
    env = subprocess_env()
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, timeout=300)
    for name, model in models.items():
        with torch.no_grad():
            assert torch.equal(torch.load(tmp_path / f"{name}.pt"), model(ids).logits), name


def tiny_own_head_dim(seed: int = 0) -> MistralForCausalLM:
    """A Mistral model with Mistral-Nemo's layout: head_dim (12) is not hidden_size / num_heads (8)."""
    return tiny_attention_model(
        MistralForCausalLM, MistralConfig, seed, head_dim=12, max_position_embeddings=64
    )


@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_mlp"])
@pytest.mark.parametrize("layout", ["head_dim_is_width_over_heads", "own_head_dim"])
def test_init_from_attention_maps_q_k_v_o_with_gqa_and_rope_order(mixer: str, layout: str) -> None:
    base = perturb_(
        tiny_llama(kv_heads=2) if layout == "head_dim_is_width_over_heads" else tiny_own_head_dim(), seed=4
    )
    model = swap(base, mixer, init="attention")
    head_dim, groups = base.config.head_dim, 2
    order = rope_half_to_interleaved(head_dim)
    if head_dim == 8:
        assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
        assert "head_dim" not in model.config.mixer_options.get(mixer, {})
    else:
        assert model.config.mixer_options[mixer]["head_dim"] == head_dim
    attention = base.model.layers[0].self_attn
    ttt = model.model.layers[0].self_attn
    assert ttt.head_dim == head_dim and ttt.q_proj.weight.shape == (4 * head_dim, 32)
    for head in range(4):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        kv_rows = slice((head // groups) * head_dim, (head // groups + 1) * head_dim)
        assert torch.equal(ttt.q_proj.weight[rows], attention.q_proj.weight[rows][order])
        assert torch.equal(ttt.k_proj.weight[rows], attention.k_proj.weight[kv_rows][order])
        assert torch.equal(ttt.v_proj.weight[rows], attention.v_proj.weight[kv_rows])
    assert torch.equal(ttt.o_proj.weight, attention.o_proj.weight)
    # the reordering moves each RoPE pair (i, i + d/2) to (2i, 2i + 1) and keeps every q.k product
    q, k = attention.q_proj.weight[:head_dim], attention.k_proj.weight[:head_dim]
    assert torch.allclose(q.T @ k, ttt.q_proj.weight[:head_dim].T @ ttt.k_proj.weight[:head_dim], atol=1e-6)
    # the swapped model runs and decodes exactly with its cache
    ids = random_ids(2, 9)
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, greedy_without_cache(model, ids, 4))


def test_init_attention_copies_attention_layers() -> None:
    base = perturb_(tiny_llama(), seed=4)
    model = swap(base, "attention", [0], init="attention")
    for key, value in base.model.layers[0].self_attn.state_dict().items():
        assert torch.equal(model.model.layers[0].self_attn.state_dict()[key], value)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: swap_mixer(torch.nn.Linear(2, 2), "ttt_linear"), TypeError, "LlamaForCausalLM"),
        (lambda: swap_mixer(tiny_mistral(sliding_window=16), "ttt_linear"), ValueError, "window of 16"),
        (lambda: swap_mixer(tiny_qwen2(sliding_window=16), "ttt_linear"), ValueError, "window of 16"),
        (lambda: swap_mixer(tiny_qwen2(), "ttt_linear", init="attention"), ValueError, "biased q/k/v"),
        (lambda: swap_mixer(tiny_llama(), "transformer_xl"), ValueError, "mixer must be one of"),
        (lambda: swap_mixer(tiny_llama(), "ttt_linear", [0, 2]), ValueError, r"out of range"),
        (lambda: swap_mixer(tiny_llama(), "ttt_linear", [-1]), ValueError, r"out of range"),
        (lambda: swap_mixer(tiny_llama(), "ttt_linear", "every:0"), ValueError, "every:k"),
        (lambda: swap_mixer(tiny_llama(), "ttt_linear", "some"), ValueError, "layers must be"),
        (lambda: swap_mixer(tiny_llama(), "ttt_linear", [1, 1]), ValueError, "distinct"),
        (lambda: swap_mixer(tiny_llama(), "ttt_linear", init="zeros"), ValueError, "init must be"),
        (lambda: swap_mixer(tiny_llama(), "gla", init="attention"), ValueError, "init='attention' supports"),
        (lambda: swap_mixer(tiny_mamba(), "ttt_linear", init="attention"), ValueError, "hold no attention"),
        (
            lambda: swap_mixer(tiny_llama(), "ttt_linear", init="attention", num_heads=2),
            ValueError,
            "heads of size",
        ),
        (
            lambda: swap_mixer(tiny_own_head_dim(), "ttt_linear", init="attention", head_dim=8),
            ValueError,
            "head_dim=8 differs from the attention's head_dim 12",
        ),
        (
            lambda: swap_mixer(tiny_llama(), "ttt_linear", head_dim=0),
            ValueError,
            "head_dim must be an int >= 1",
        ),
        (lambda: swap_mixer(tiny_llama(), "ttt_linear", head_dim="8"), TypeError, "head_dim must be an int"),
        (
            lambda: swap_mixer(swap(tiny_llama(), "ttt_linear", [0]), "ttt_linear", [1], mini_batch_size=8),
            ValueError,
            "mixer_options",
        ),
    ],
)
def test_bad_input_gets_clear_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()
