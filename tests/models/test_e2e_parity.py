"""Parity with the TTT-E2E authors' JAX code (github test-time-training/e2e): their tiny model runs
its meta-learning forward and outer gradient and is saved with their ``Checkpointer``; our converter
loads that checkpoint and our forward gives their logits within 1e-4 (float32) and their outer-loss
gradients within 1e-3 relative (max |ours - theirs| / max |theirs|, per parameter).

Runs only where their checkout is named by ``TTT_E2E_REPO`` and their dependencies are installed
(``bash scripts/setup_e2e_reference.sh``); their code is not on PyPI and is never part of this
repository, so CI, which reaches package registries only, skips it. About a minute and a half per
case (JAX compiles their scan)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e_reference import REPO_ENV, reference_repo, run_reference

from ttt_mixer.e2e.convert import e2e_state_dict, load_e2e_checkpoint

MISSING = [
    name
    for name in ("jax", "equinox", "optax", "orbax", "grain", "hydra")
    if importlib.util.find_spec(name) is None
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        reference_repo() is None, reason=f"{REPO_ENV} does not name a checkout of the authors' e2e code"
    ),
    pytest.mark.skipif(bool(MISSING), reason=f"their dependencies are not installed: {MISSING}"),
]

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "mini_batch_size": 4,
    "sliding_window_size": 6,
    "rope_theta": 10000.0,
    "initializer_range": 0.2,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
# (their model options, inner clip): untied with clipping in some steps (inner gradient norms 2.4-3.5
# here), tied with one suffix block and no clipping
CASES = {
    "untied-suffix2-clip3": ({"suffix_len": 2, "tie_word_embeddings": False, "output_size": 64}, 3.0),
    "tied-suffix1-noclip": ({"suffix_len": 1, "tie_word_embeddings": True}, 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_checkpoint_matches_their_logits_and_outer_gradients(case: str, tmp_path: Path) -> None:
    options, clip = CASES[case]
    tokens = np.random.default_rng(0).integers(2, TINY["vocab_size"], size=(2, 17))
    theirs = run_reference(
        reference_repo(),
        {**TINY, **options, "seq_modeling_block": "SWA", "prime": True},
        tokens,
        1.0,
        clip,
        tmp_path / "run",
    )
    settings = {
        key: TINY[key]
        for key in ("mini_batch_size", "sliding_window_size", "rope_theta", "bos_token_id", "eos_token_id")
    }
    model = load_e2e_checkpoint(tmp_path / "run", inner_lr=1.0, inner_clip_gradient=clip, **settings)
    assert model.config.tie_word_embeddings == options["tie_word_embeddings"]
    assert model.config.suffix_len == options["suffix_len"]
    ids = torch.from_numpy(tokens).long()
    out = model(ids, labels=ids)
    logit_error = np.abs(out.logits[:, :-1].detach().numpy() - theirs["logits"]).max()
    assert logit_error < 1e-4, logit_error
    assert out.loss.item() == pytest.approx(theirs["loss"], abs=1e-5)
    out.loss.backward()
    their_grads = e2e_state_dict(theirs["grads"], model.config)
    errors = {
        name: (parameter.grad - their_grads[name]).abs().max().item() / their_grads[name].abs().max().item()
        for name, parameter in model.named_parameters()
    }
    worst = max(errors, key=errors.get)
    print(
        f"{case}: max logit difference {logit_error:.2e}; worst gradient relative difference {errors[worst]:.2e} ({worst})"
    )
    assert errors[worst] < 1e-3, (worst, errors[worst])
