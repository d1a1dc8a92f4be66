"""The TTT-E2E converter (``ttt_mixer.e2e.convert``): the authors' arrays (their ``MetaModel.weights()``
tree: blocks stacked over layers, linear weights [in, out], the inner MLPs in ``prime_storage``) back
to the model they came from, the config read off their shapes, errors naming every offending array;
and, where orbax-checkpoint is installed, their orbax layout read from disk through the command line.
The parity with their own code is tests/models/test_e2e_parity.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env
from test_e2e import TINY, ids, tiny_model

from ttt_mixer.e2e import E2EConfig, E2EForCausalLM
from ttt_mixer.e2e.convert import e2e_config, e2e_state_dict, from_e2e_params, load_e2e_checkpoint

HAS_ORBAX = importlib.util.find_spec("orbax") is not None
SETTINGS = {
    key: TINY[key] for key in ("mini_batch_size", "sliding_window_size", "bos_token_id", "eos_token_id")
} | {"rope_theta": 10000.0, "inner_clip_gradient": TINY["inner_clip_gradient"]}


def their_arrays(model: E2EForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights in the authors' tree (their checkpoint's dotted paths)."""
    state = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    config = model.config
    first_suffix = config.num_hidden_layers - config.suffix_len

    def stacked(name: str, layers: range, transpose: bool) -> np.ndarray:
        return np.stack(
            [
                state[f"model.layers.{i}.{name}"].T if transpose else state[f"model.layers.{i}.{name}"]
                for i in layers
            ]
        )

    every, suffix = range(config.num_hidden_layers), range(first_suffix, config.num_hidden_layers)
    blocks, prime = "language_model.model.h.blocks.", "language_model.model.h.prime_storage."
    arrays = {
        "language_model.model.wte.weight": state["model.embeddings.weight"],
        "language_model.model.ln_f.weight": state["model.norm.weight"],
        "language_model.lm_head.weight": state["lm_head.weight"].T,
    }
    for theirs, ours in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        arrays[f"{blocks}seq_modeling_block.{theirs}.weight"] = stacked(f"attn.{ours}.weight", every, True)
    for norm in ("q_norm", "k_norm"):
        arrays[f"{blocks}seq_modeling_block.{norm}.weight"] = stacked(f"attn.{norm}.weight", every, False)
    for theirs, ours in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        arrays[f"{blocks}feed_forward.{theirs}.weight"] = stacked(f"mlp.{ours}.weight", every, True)
        arrays[f"{prime}feed_forward_prime.{theirs}.weight"] = stacked(
            f"feed_forward_prime.{ours}.weight", suffix, True
        )
    for theirs, ours in (
        ("seq_norm", "attn_norm"),
        ("seq_post_norm", "attn_post_norm"),
        ("ffn_norm", "mlp_norm"),
        ("ffn_post_norm", "mlp_post_norm"),
    ):
        arrays[f"{blocks}{theirs}.weight"] = stacked(f"{ours}.weight", every, False)
    for theirs, ours in (
        ("ffn_prime_norm", "feed_forward_prime_norm"),
        ("ffn_prime_post_norm", "feed_forward_prime_post_norm"),
    ):
        arrays[f"{prime}{theirs}.weight"] = stacked(f"{ours}.weight", suffix, False)
    return arrays


def test_their_arrays_convert_back_to_the_model_with_its_config() -> None:
    model, tokens = tiny_model(torch.float32), ids(2, 11)
    arrays = their_arrays(model)
    config = e2e_config(arrays, **SETTINGS)
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "suffix_len",
    ):
        assert getattr(config, field) == getattr(model.config, field), field
    assert not config.tie_word_embeddings
    converted = from_e2e_params(arrays, **SETTINGS)
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_a_tied_checkpoint_has_no_head_and_shares_the_embeddings() -> None:
    model = tiny_model(torch.float32, tie_word_embeddings=True)
    arrays = their_arrays(model)
    del arrays["language_model.lm_head.weight"]
    converted = from_e2e_params(arrays, **SETTINGS)
    assert converted.config.tie_word_embeddings
    assert converted.lm_head.weight.data_ptr() == converted.model.embeddings.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids(1, 9)).logits, model(ids(1, 9)).logits, rtol=0, atol=0)


def test_bad_arrays_are_named() -> None:
    arrays = their_arrays(tiny_model(torch.float32))
    config = E2EConfig(**{**TINY, "rope_theta": 10000.0})
    broken = dict(arrays)
    del broken["language_model.model.ln_f.weight"]
    broken["language_model.model.extra.weight"] = np.zeros(3, dtype=np.float32)
    broken["language_model.model.h.blocks.ffn_norm.weight"] = np.zeros((3, 5), dtype=np.float32)
    with pytest.raises(ValueError) as error:
        e2e_state_dict(broken, config)
    message = str(error.value)
    assert "model.norm.weight" in message and "language_model.model.extra.weight" in message
    assert "model.layers.0.mlp_norm.weight [5]" in message
    with pytest.raises(ValueError, match="wte"):
        e2e_config({})


@pytest.mark.skipif(not HAS_ORBAX, reason="orbax-checkpoint is not installed (pip install orbax-checkpoint)")
def test_an_orbax_checkpoint_converts_through_the_command_line(tmp_path: Path) -> None:
    import orbax.checkpoint as ocp

    model, tokens = tiny_model(torch.float32), ids(1, 10)
    tree: dict = {}
    for key, value in their_arrays(model).items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "run" / "7" / "model_weights").resolve(), tree)
    checkpointer.wait_until_finished()
    assert torch.equal(load_e2e_checkpoint(tmp_path / "run", **SETTINGS).lm_head.weight, model.lm_head.weight)
    settings = [
        arg
        for key, value in SETTINGS.items()
        for arg in ("--set", f"{key}={'null' if value is None else value}")
    ]
    command = [
        sys.executable,
        "-m",
        "ttt_mixer.cli",
        "convert",
        "--from",
        "ttt-e2e",
        str(tmp_path / "run"),
        str(tmp_path / "hf"),
        *settings,
    ]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    converted = E2EForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens).logits, model(tokens).logits, rtol=0, atol=0)
