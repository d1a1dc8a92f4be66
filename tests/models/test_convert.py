"""Tests of the conversion from the authors' checkpoint layout (``ttt_mixer.convert``) against logits
that their own code (ttt-lm-pytorch) produced, stored in the shared fixtures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ttt_mixer import TTTForCausalLM
from ttt_mixer.cli import main
from ttt_mixer.convert import config_from_ttt_lm_pytorch, from_ttt_lm_pytorch, load_ttt_lm_pytorch_checkpoint
from ttt_mixer.models.causal_lm import CACHE_FIELD

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
REFERENCE_WEIGHTS = FIXTURES / "ttt_lm_pytorch_reference.safetensors"
REFERENCE_CONFIGS = FIXTURES / "ttt_lm_pytorch_reference.json"
CASES = ("linear_transformer", "linear_mamba", "mlp_transformer", "mlp_mamba")
TOL = 1e-4  # fixtures/README.md: float32 logits within 1e-4
BLOCK = "model.layers.0.seq_modeling_block"


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict]:
    missing = [p for p in (REFERENCE_WEIGHTS, REFERENCE_CONFIGS) if not p.is_file()]
    if missing:
        pytest.fail(
            f"reference fixtures missing: {[str(p) for p in missing]}; they live in ../shared/fixtures next "
            "to the repository root (see shared/fixtures/README.md)"
        )
    return load_file(REFERENCE_WEIGHTS), json.loads(REFERENCE_CONFIGS.read_text())


def case_data(reference, case: str) -> tuple[dict[str, torch.Tensor], dict, torch.Tensor, torch.Tensor]:
    """(state_dict with the authors' ``model.`` keys, config dict, input_ids, their logits)."""
    tensors, configs = reference
    prefix = f"{case}/state/"
    state = {k[len(prefix) :]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}
    assert state, f"no state for case {case} in {REFERENCE_WEIGHTS}"
    return state, dict(configs[case]), tensors[f"{case}/input_ids"], tensors[f"{case}/logits"]


def logits_of(model: TTTForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


def assert_matches_reference(model: TTTForCausalLM, input_ids: torch.Tensor, expected: torch.Tensor) -> None:
    logits = logits_of(model, input_ids)
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    err = (logits - expected).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3e} against the authors' logits"


@pytest.mark.parametrize("case", CASES)
def test_reproduces_authors_logits(reference, case: str) -> None:
    state, config, input_ids, expected = case_data(reference, case)
    model = from_ttt_lm_pytorch(state, config)
    assert not model.training
    assert model.config.ttt_layer_type == config["ttt_layer_type"]
    assert model.config.share_qk == config["share_qk"] and model.config.pre_conv == config["pre_conv"]
    assert_matches_reference(model, input_ids, expected)


@pytest.mark.parametrize("case", CASES)
def test_reproduces_authors_logits_without_model_prefix(reference, case: str) -> None:
    """Their TTTModel's state dict: the same keys without ``model.``."""
    state, config, input_ids, expected = case_data(reference, case)
    stripped = {k.removeprefix("model."): v for k, v in state.items()}
    assert not any(k.startswith("model.") for k in stripped)
    assert_matches_reference(from_ttt_lm_pytorch(stripped, config), input_ids, expected)


def test_cached_decoding_of_converted_model_matches_authors_logits(reference) -> None:
    state, config, input_ids, expected = case_data(reference, "mlp_mamba")
    model = from_ttt_lm_pytorch(state, config)
    cache, logits = None, []
    with torch.no_grad():
        for start, end in ((0, 13), (13, 14), (14, 30), (30, 45)):
            out = model(input_ids[:, start:end], past_key_values=cache, use_cache=True)
            cache = getattr(out, CACHE_FIELD)
            logits.append(out.logits)
    err = (torch.cat(logits, dim=1) - expected).abs().max().item()
    assert err <= TOL, err


def test_lr_gate_weight_in_spec_layout(reference) -> None:
    """The gate weight is sometimes written [H, D, 1] (docs/conventions.md section 1); the fixtures hold [H, 1, D]: both convert."""
    state, config, input_ids, expected = case_data(reference, "linear_transformer")
    for layer in range(config["num_hidden_layers"]):
        key = f"model.layers.{layer}.seq_modeling_block.learnable_ttt_lr_weight"
        state[key] = state[key].transpose(1, 2).contiguous()
        assert state[key].shape == (2, 64, 1)
    assert_matches_reference(from_ttt_lm_pytorch(state, config), input_ids, expected)


def test_untied_lm_head(reference) -> None:
    state, config, input_ids, _ = case_data(reference, "linear_mamba")
    tied = from_ttt_lm_pytorch(state, config)
    lm_head = torch.randn(61, 64, generator=torch.Generator().manual_seed(0))
    untied = from_ttt_lm_pytorch(
        {**state, "lm_head.weight": lm_head}, {**config, "tie_word_embeddings": False}
    )
    assert untied.lm_head.weight is not untied.model.embeddings.weight
    with torch.no_grad():
        hidden = tied.model(input_ids).last_hidden_state
        torch.testing.assert_close(untied(input_ids).logits, hidden @ lm_head.T, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=re.escape("lm_head.weight")):
        from_ttt_lm_pytorch(state, {**config, "tie_word_embeddings": False})


def test_the_model_takes_the_checkpoints_dtype(reference) -> None:
    """A float64 checkpoint gives a float64 model computing the float32 one's logits (to float32
    rounding of the weights, well inside TOL); bfloat16 tensors beside float32 ones give float32:
    the widest dtype, so that nothing is cast to less precision."""
    state, config, input_ids, expected = case_data(reference, "linear_transformer")
    double = from_ttt_lm_pytorch({k: v.double() for k, v in state.items()}, config)
    assert all(p.dtype == torch.float64 for p in double.parameters())
    assert (logits_of(double, input_ids).float() - expected).abs().max().item() <= TOL
    mixed = {k: v.bfloat16() if k.endswith("norm.weight") else v for k, v in state.items()}
    assert all(p.dtype == torch.float32 for p in from_ttt_lm_pytorch(mixed, config).parameters())


# Errors ------------------------------------------------------------------------------------------


def test_missing_key(reference) -> None:
    state, config, _, _ = case_data(reference, "mlp_mamba")
    del state[f"{BLOCK}.W2"]
    with pytest.raises(ValueError, match=re.escape("layers.0.seq_modeling_block.W2")):
        from_ttt_lm_pytorch(state, config)


def test_unexpected_key(reference) -> None:
    state, config, _, _ = case_data(reference, "linear_transformer")
    state[f"{BLOCK}.W2"] = torch.zeros(2, 32, 32)  # a TTT-MLP tensor in a TTT-Linear checkpoint
    with pytest.raises(ValueError, match=re.escape("layers.0.seq_modeling_block.W2")):
        from_ttt_lm_pytorch(state, config)


@pytest.mark.parametrize(
    "key, shape",
    [(f"{BLOCK}.W1", (2, 32, 31)), (f"{BLOCK}.learnable_token_idx", (7,)), ("model.norm.weight", (64, 1))],
    ids=["W1", "token_idx", "norm"],
)
def test_wrong_shape(reference, key: str, shape: tuple[int, ...]) -> None:
    state, config, _, _ = case_data(reference, "linear_mamba")
    state[key] = torch.zeros(shape)
    with pytest.raises(ValueError, match=re.escape(key.removeprefix("model."))):
        from_ttt_lm_pytorch(state, config)


def test_unknown_config_field(reference) -> None:
    state, config, _, _ = case_data(reference, "linear_transformer")
    with pytest.raises(ValueError, match="ttt_flux_capacitor"):
        from_ttt_lm_pytorch(state, {**config, "ttt_flux_capacitor": 3})
    with pytest.raises(ValueError, match="ttt_flux_capacitor"):
        config_from_ttt_lm_pytorch({**config, "ttt_flux_capacitor": 3})


def test_bad_config_value(reference) -> None:
    state, config, _, _ = case_data(reference, "linear_transformer")
    with pytest.raises(ValueError, match="ttt_layer_type"):
        from_ttt_lm_pytorch(state, {**config, "ttt_layer_type": "rnn"})


def test_ignored_config_fields_are_accepted(reference) -> None:
    state, config, input_ids, expected = case_data(reference, "linear_transformer")
    extra = {"hidden_act": "silu", "pretraining_tp": 1, "use_cache": False, "scan_checkpoint_group_size": 0}
    assert_matches_reference(from_ttt_lm_pytorch(state, {**config, **extra}), input_ids, expected)


# Checkpoint folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_load_checkpoint_folder(reference, tmp_path: Path, weights_file: str) -> None:
    state, config, input_ids, expected = case_data(reference, "mlp_transformer")
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "ttt", "hidden_act": "silu"}))
    if weights_file == "model.safetensors":
        save_file(state, tmp_path / weights_file)
    else:
        torch.save(state, tmp_path / weights_file)
    loaded_state, loaded_config = load_ttt_lm_pytorch_checkpoint(tmp_path)
    assert loaded_state.keys() == state.keys()
    assert all(torch.equal(loaded_state[k], state[k]) for k in state)
    assert loaded_config["ttt_layer_type"] == "mlp"
    assert_matches_reference(from_ttt_lm_pytorch(loaded_state, loaded_config), input_ids, expected)


def test_load_checkpoint_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config\.json"):
        load_ttt_lm_pytorch_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_ttt_lm_pytorch_checkpoint(tmp_path)


def test_command_line_convert(reference, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state, config, input_ids, expected = case_data(reference, "mlp_mamba")
    source, destination = tmp_path / "theirs", tmp_path / "ours"
    source.mkdir()
    save_file(state, source / "model.safetensors")
    (source / "config.json").write_text(json.dumps(config))
    main(["convert", str(source), str(destination)])
    assert str(destination) in capsys.readouterr().out
    assert_matches_reference(TTTForCausalLM.from_pretrained(destination), input_ids, expected)
