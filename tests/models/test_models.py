"""Tests of the Hugging Face models (``TTTConfig``, ``TTTForCausalLM``): forward, loss and backward,
generation with the recurrent cache against recomputation without it, bounded state, Auto-class
registration, save/reload (also through remote code in a fresh process) and input validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    MODEL_CASE_IDS,
    MODEL_CASES,
    TINY_CONFIG,
    assert_same_model_outputs,
    greedy_without_cache,
    make_config,
    make_model,
    subprocess_env,
)
from fla.models.utils import Cache
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ttt_mixer import TTTConfig, TTTForCausalLM, TTTModel
from ttt_mixer.models.causal_lm import CACHE_FIELD

VOCAB = 50
B = 4  # mini-batch size of the tiny models
TOL = 1e-10  # float64


def random_ids(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Token ids in [3, VOCAB): never the pad (0), bos (1) or eos (2) ids."""
    return torch.randint(3, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def cache_tensors(cache: Cache) -> list[torch.Tensor]:
    """Every tensor in every layer's cache entry."""
    tensors = []
    for layer in range(len(cache)):
        for value in cache[layer].values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, (tuple, list)):
                tensors += [t for t in value if isinstance(t, torch.Tensor)]
    return tensors


model_cases = pytest.mark.parametrize("ttt_layer_type, backbone", MODEL_CASES, ids=MODEL_CASE_IDS)


# Forward, loss, backward -------------------------------------------------------------------------


@model_cases
def test_forward_loss_backward(ttt_layer_type: str, backbone: str) -> None:
    model = make_model(ttt_layer_type, backbone).train()
    ids = random_ids(2, 11, seed=1)
    labels = ids.clone()
    labels[0, 3] = labels[1, -2] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 11, VOCAB) and getattr(out, CACHE_FIELD) is None  # no cache in training
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-6)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert model.lm_head.weight is model.model.embeddings.weight  # tied embeddings


@model_cases
def test_backbone_layout(ttt_layer_type: str, backbone: str) -> None:
    model = make_model(ttt_layer_type, backbone)
    mamba = backbone == "mamba"
    for block in model.model.layers:
        assert (block.pre_conv is not None) == mamba
        assert block.attn.share_qk == mamba and block.attn.use_gate == mamba
        assert block.attn.spec.inner_model == ttt_layer_type
        assert block.attn.mini_batch_size == B
    expected_lr = {"linear": 1.0, "mlp": 0.1}[ttt_layer_type]
    assert model.model.layers[0].attn.base_lr == expected_lr


@model_cases
def test_outputs_agree_across_call_styles(ttt_layer_type: str, backbone: str) -> None:
    model = make_model(ttt_layer_type, backbone, dtype=torch.float64)
    ids = random_ids(2, 9, seed=2)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        as_tuple = model(ids, return_dict=False, use_cache=False)
        last = model(ids, logits_to_keep=1).logits
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(embeds, out.logits)
    assert torch.equal(as_tuple[0], out.logits)
    torch.testing.assert_close(last, out.logits[:, -1:], rtol=0, atol=TOL)


@model_cases
@pytest.mark.parametrize(
    "lengths", [(5, 3, 1, 4), (1,) * 13, (4, 9)], ids=["5-3-1-4", "token_by_token", "4-9"]
)
def test_cached_chunks_equal_one_pass(ttt_layer_type: str, backbone: str, lengths: tuple[int, ...]) -> None:
    model = make_model(ttt_layer_type, backbone, dtype=torch.float64)
    ids = random_ids(2, sum(lengths), seed=3)
    cache, logits, start = None, [], 0
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for n in lengths:
            out = model(ids[:, start : start + n], past_key_values=cache, use_cache=True)
            cache = getattr(out, CACHE_FIELD)
            logits.append(out.logits)
            start += n
    assert isinstance(cache, Cache)
    assert (torch.cat(logits, dim=1) - full).abs().max() <= TOL


@model_cases
def test_padded_and_packed_batches_equal_each_sequence_alone(ttt_layer_type: str, backbone: str) -> None:
    model = make_model(ttt_layer_type, backbone, dtype=torch.float64)
    sequences = [random_ids(1, n, seed=20 + n) for n in (5, 9, 3)]
    with torch.no_grad():
        alone = [model(s).logits[0] for s in sequences]
        width = 9
        for side in ("left", "right"):
            ids = torch.zeros(3, width, dtype=torch.long)
            mask = torch.zeros(3, width, dtype=torch.long)
            places = []
            for i, s in enumerate(sequences):
                n = s.shape[1]
                place = slice(width - n, width) if side == "left" else slice(0, n)
                ids[i, place], mask[i, place] = s[0], 1
                places.append(place)
            logits = model(ids, attention_mask=mask).logits
            for i, place in enumerate(places):
                assert (logits[i, place] - alone[i]).abs().max() <= TOL, (side, i)
        cu_seqlens = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
        packed = model(torch.cat(sequences, dim=1), cu_seqlens=cu_seqlens).logits[0]
        for i, expected in enumerate(alone):
            assert (packed[cu_seqlens[i] : cu_seqlens[i + 1]] - expected).abs().max() <= TOL, ("packed", i)


@model_cases
def test_gradient_checkpointing_gives_the_same_gradients(ttt_layer_type: str, backbone: str) -> None:
    model = make_model(ttt_layer_type, backbone, dtype=torch.float64).train()
    ids = random_ids(2, 9, seed=21)
    plain = torch.autograd.grad(model(ids, labels=ids).loss, list(model.parameters()))
    # transformers renamed gradient_checkpointing_enable (deprecated) to activation_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(block.gradient_checkpointing for block in model.model.layers)
    checkpointed = torch.autograd.grad(model(ids, labels=ids).loss, list(model.parameters()))
    for p, q in zip(plain, checkpointed, strict=True):
        assert (p - q).abs().max() <= TOL


# Generation --------------------------------------------------------------------------------------


@model_cases
@pytest.mark.parametrize("prompt_len", [5, 7])
def test_greedy_generate_equals_uncached_argmax(ttt_layer_type: str, backbone: str, prompt_len: int) -> None:
    model = make_model(ttt_layer_type, backbone, dtype=torch.float64)
    ids = random_ids(2, prompt_len, seed=4)
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=7, do_sample=False)
        expected = greedy_without_cache(model, ids, 7)
    assert generated.shape == (2, prompt_len + 7)
    assert torch.equal(generated, expected)


@model_cases
def test_greedy_generate_left_padded_batch(ttt_layer_type: str, backbone: str) -> None:
    model = make_model(ttt_layer_type, backbone, dtype=torch.float64)
    lengths = (5, 2, 7)
    prompts = [random_ids(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)  # pad id 0
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, greedy_without_cache(model, ids, 6, mask))
        for i, p in enumerate(prompts):
            alone = greedy_without_cache(model, p[None], 6)
            assert torch.equal(generated[i, width:], alone[0, len(p) :]), f"sequence {i}"


@model_cases
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_beam_search_with_cache_equals_without(ttt_layer_type: str, backbone: str, padded: bool) -> None:
    model = make_model(ttt_layer_type, backbone, dtype=torch.float64)
    ids = random_ids(2, 6, seed=5)
    mask = torch.ones_like(ids)
    if padded:
        ids[0, :3], mask[0, :3] = 0, 0
    kwargs = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "num_return_sequences": 3}
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, use_cache=True, **kwargs)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
        first_alone = model.generate(ids[:1, 3:] if padded else ids[:1], use_cache=True, **kwargs)
    assert cached.shape == (6, 12)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:3, 6:], first_alone[:, -6:])


@model_cases
def test_sampling(ttt_layer_type: str, backbone: str) -> None:
    model = make_model(ttt_layer_type, backbone, dtype=torch.float64)
    ids = random_ids(2, 5, seed=6)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        with torch.no_grad():
            runs.append(model.generate(ids, do_sample=True, top_k=0, max_new_tokens=6, use_cache=use_cache))
    assert runs[0].shape == (2, 11) and runs[0].dtype == torch.long
    assert torch.equal(runs[0][:, :5], ids)
    assert ((runs[0] >= 0) & (runs[0] < VOCAB)).all()
    assert torch.equal(runs[0], runs[1])  # seeded: reproducible
    assert torch.equal(runs[0], runs[2])  # the cache changes nothing


@model_cases
def test_cache_state_does_not_grow_with_prompt(ttt_layer_type: str, backbone: str) -> None:
    model = make_model(ttt_layer_type, backbone)
    caches = {}
    with torch.no_grad():
        for n in (5, 50):
            cache = getattr(model(random_ids(2, n, seed=n), use_cache=True), CACHE_FIELD)
            caches[n] = cache
            assert len(cache) == model.config.num_hidden_layers
            for layer in range(len(cache)):
                assert cache[layer]["attn_state"] is None  # nothing that grows with the sequence
                assert cache[layer]["recurrent_state"][0].tolist() == [n % B] * 2
            model(random_ids(2, 1, seed=7), past_key_values=cache, use_cache=True)  # one decode step
    short, long = cache_tensors(caches[5]), cache_tensors(caches[50])
    assert len(short) == len(long) > 0
    assert [t.shape for t in short] == [t.shape for t in long]
    ttt_state_len = 1 + 4 * (1 if ttt_layer_type == "linear" else 2)
    assert len(caches[5][0]["recurrent_state"]) == ttt_state_len


# Auto classes, save and reload -------------------------------------------------------------------


def test_auto_classes_resolve_ttt(tmp_path: Path) -> None:
    config = AutoConfig.for_model("ttt_mixer", **TINY_CONFIG, ttt_layer_type="mlp", backbone="mamba")
    assert type(config) is TTTConfig and config.share_qk and config.hidden_size == 32
    config.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is TTTConfig
    assert type(AutoModelForCausalLM.from_config(config)) is TTTForCausalLM
    assert type(AutoModel.from_config(config)) is TTTModel


@pytest.mark.slow
def test_save_pretrained_and_reload_through_remote_code_in_fresh_process(tmp_path: Path) -> None:
    model = make_model("mlp", "mamba", seed=3)
    ids = random_ids(2, 10, seed=8)
    with torch.no_grad():
        expected = model(ids).logits
    folder = tmp_path / "tiny_ttt"
    model.save_pretrained(folder)
    assert {"model.safetensors", "config.json", "ttt_mixer_remote.py"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "ttt_mixer"
    assert config["auto_map"]["AutoModelForCausalLM"] == "ttt_mixer_remote.TTTForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "ttt_mixer_remote.TTTConfig"
    assert config["auto_map"]["AutoModel"] == "ttt_mixer_remote.TTTModel"

    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'ttt_mixer' not in sys.modules\n"
        "folder, ids_file, out_file = sys.argv[1:4]\n"
        "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()\n"
        "with torch.no_grad():\n"
        "    logits = model(torch.load(ids_file)).logits\n"
        "torch.save({'logits': logits, 'class': type(model).__name__}, out_file)\n"
    )
    env = subprocess_env(HF_HOME=str(tmp_path / "hf_home"), PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reloaded = torch.load(tmp_path / "out.pt")
    assert reloaded["class"] == "TTTForCausalLM"
    assert_same_model_outputs(reloaded["logits"], expected)

    again = TTTForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert_same_model_outputs(again(ids).logits, expected)
    assert again.lm_head.weight is again.model.embeddings.weight


@model_cases
def test_from_pretrained_in_process(ttt_layer_type: str, backbone: str, tmp_path: Path) -> None:
    model = make_model(ttt_layer_type, backbone, seed=4)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is TTTForCausalLM
    assert reloaded.config.backbone == backbone and reloaded.config.ttt_layer_type == ttt_layer_type
    ids = random_ids(2, 9, seed=9)
    with torch.no_grad():
        assert_same_model_outputs(reloaded(ids).logits, model(ids).logits)


# Input validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"ttt_layer_type": "rnn"}, "ttt_layer_type"),
        ({"backbone": "rwkv"}, "backbone"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
        ({"mini_batch_size": 0}, "mini_batch_size"),
    ],
    ids=["layer_type", "backbone", "indivisible_heads", "mini_batch_0"],
)
def test_config_rejects_bad_fields(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_config(**overrides)


def test_forward_with_cache_of_other_batch_size() -> None:
    model = make_model("linear", "mamba")
    with torch.no_grad():
        cache = getattr(model(random_ids(2, 6), use_cache=True), CACHE_FIELD)
        for n in (1, 3):
            with pytest.raises(ValueError, match="cache holds 2 sequences"):
                model(random_ids(3, n), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "input_ids"),
        ({"input_ids": random_ids(2, 4), "inputs_embeds": torch.zeros(2, 4, 32)}, "input_ids"),
        ({"input_ids": random_ids(1, 4)[0]}, "input_ids"),
        ({"input_ids": random_ids(2, 0)}, "seq_len"),
        ({"input_ids": random_ids(2, 4), "attention_mask": torch.ones(2, 3)}, "attention_mask"),
        ({"input_ids": random_ids(2, 4), "attention_mask": torch.full((2, 4), 2)}, "attention_mask"),
    ],
    ids=["no_input", "both_inputs", "rank_1_ids", "empty", "short_mask", "mask_value_2"],
)
def test_model_rejects_bad_input(kwargs: dict, match: str) -> None:
    model = make_model("linear", "transformer")
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_a_config_takes_the_commit_hash_older_transformers_hand_it() -> None:
    """transformers up to 5.17 passes ``_commit_hash`` to a config it loads; refusing it would make
    every saved TTT checkpoint unloadable there (the GPU image's version)."""
    config = TTTConfig(**TINY_CONFIG, _commit_hash="0" * 40)
    assert config.ttt_layer_type == "linear"
    with pytest.raises(TypeError, match="_commit_hahs"):
        TTTConfig(**TINY_CONFIG, _commit_hahs="0" * 40)
