"""``ttt-mixer to-e2e``: a saved Llama checkpoint becomes a TTT-E2E folder with its tokenizer that
loads with trust_remote_code and computes the Llama's logits until its first inner step; bad flags
and sources it cannot convert exactly are refused before anything is read or written; and the
real-model fixture (SmolLM2-135M) converts the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config

from ttt_mixer.cli import main
from ttt_mixer.e2e import E2EForCausalLM
from ttt_mixer.tokenizer import byte_tokenizer

# float32: both models sum the same products in other orders and round RoPE's float32 angles
# differently (docs/conventions.md section 6); measured at most 9e-8 over five seeds on logits up
# to 0.46 (float32's spacing there is 3e-8), so 1e-6 leaves room for another BLAS yet is far below
# the 9e-3 and more that the first inner step moves the next mini-batch's logits
FLOAT32_TOLERANCE = 1e-6

SETTINGS = ["--sliding-window-size", "32", "--suffix-len", "2", "--mini-batch-size", "8"]


def byte_llama_config(**overrides: object) -> LlamaConfig:
    """``tiny_llama_config`` over the byte tokenizer's vocabulary and special tokens."""
    tokenizer = byte_tokenizer()
    fields = dict(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tiny_llama_config(**(fields | overrides))


def saved_llama(folder: Path) -> LlamaForCausalLM:
    """A tiny random float32 Llama (grouped keys and values) saved in ``folder`` with the byte
    tokenizer."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(byte_llama_config()).eval()
    llama.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return llama


@pytest.mark.compat
def test_a_converted_llama_loads_with_its_tokenizer_and_gives_its_logits_until_the_first_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llama = saved_llama(tmp_path / "llama")
    main(["to-e2e", str(tmp_path / "llama"), str(tmp_path / "e2e"), *SETTINGS, "--inner-lr", "0.5"])
    assert f"wrote {tmp_path / 'e2e'}" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "e2e", trust_remote_code=True).eval()
    assert isinstance(model, E2EForCausalLM) and model.dtype == torch.float32
    config = model.config
    settings = (config.sliding_window_size, config.suffix_len, config.mini_batch_size, config.inner_lr)
    assert settings == (32, 2, 8, 0.5) and config.inner_clip_gradient == 1.0
    assert "auto_map" in json.loads((tmp_path / "e2e" / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "e2e")
    ids = tokenizer("Test-time training!!", return_tensors="pt").input_ids
    assert ids.shape[1] == 20  # two mini-batches of 8 and four tokens, inside the window
    with torch.no_grad():
        expected, logits = llama(ids).logits, model(ids).logits
    torch.testing.assert_close(logits[:, :8], expected[:, :8], rtol=0, atol=FLOAT32_TOLERANCE)
    assert (logits[:, 8:] - expected[:, 8:]).abs().amax() > 1e-3  # learned from the first mini-batch


def qwen2_folder(folder: Path) -> None:
    Qwen2Config(vocab_size=257, hidden_size=32, intermediate_size=48, num_hidden_layers=3).save_pretrained(
        folder
    )


def llama_config_folder(folder: Path, **overrides: object) -> None:
    """Only the config: a refusal must come before the weights are read."""
    byte_llama_config(**overrides).save_pretrained(folder)


@pytest.mark.parametrize(
    ("source", "flags", "words"),
    [
        (
            llama_config_folder,
            ["--sliding-window-size", "0"],
            "argument --sliding-window-size: expected an integer >= 1",
        ),
        (
            llama_config_folder,
            ["--mini-batch-size", "-8"],
            "argument --mini-batch-size: expected an integer >= 1",
        ),
        (llama_config_folder, ["--suffix-len", "two"], "argument --suffix-len: expected an integer >= 0"),
        (
            llama_config_folder,
            ["--suffix-len", "4"],
            "--suffix-len must be at most the checkpoint's 3 layers",
        ),
        (llama_config_folder, ["--inner-lr", "-1"], "argument --inner-lr: expected a finite number >= 0"),
        (
            llama_config_folder,
            ["--inner-clip-gradient", "nan"],
            "argument --inner-clip-gradient: expected a finite",
        ),
        (
            qwen2_folder,
            [],
            "a Qwen2 model cannot be made TTT-E2E exactly: its q, k and v projections have biases",
        ),
        (
            lambda folder: llama_config_folder(folder, attention_bias=True),
            [],
            "the Llama's attention_bias must be False",
        ),
        (lambda folder: folder.mkdir(), [], "has no config.json: not a transformers checkpoint folder"),
        (
            None,
            [],
            "nobody/no-such-model: neither a checkpoint folder nor a model in the local Hugging Face cache",
        ),
    ],
    ids=[
        "window 0",
        "mini-batch -8",
        "suffix two",
        "suffix above the layers",
        "inner lr -1",
        "clip nan",
        "qwen2",
        "llama with attention biases",
        "folder without a config",
        "hub id not cached",
    ],
)
def test_bad_flags_and_sources_are_refused_before_any_work(
    source: object, flags: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if source is None:
        name = "nobody/no-such-model"
    else:
        source(tmp_path / "source")
        name = str(tmp_path / "source")
    with pytest.raises(SystemExit) as exit:
        main(["to-e2e", name, str(tmp_path / "out"), *flags])
    assert exit.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # (argparse prints its usage first)
    assert line.startswith("ttt-mixer to-e2e: error: ") and words in line, line
    assert not (tmp_path / "out").exists()


def test_a_destination_holding_files_is_refused_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llama_config_folder(tmp_path / "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        main(["to-e2e", str(tmp_path / "llama"), str(tmp_path / "out")])
    assert "--overwrite" in capsys.readouterr().err
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_converts_and_reloads_with_its_logits_before_learning(
    real_checkpoint: Path, tmp_path: Path
) -> None:
    """The real-model fixture's folder (as ``ttt-mixer swap`` takes it) through the command: the
    saved model and tokenizer reload, and a prompt shorter than a mini-batch gets SmolLM2's logits
    (float32 over 30 blocks: within 1e-3, as tests/models/test_e2e_from_llama.py bounds it)."""
    out = tmp_path / "smollm2-e2e"
    main(["to-e2e", str(real_checkpoint), str(out), "--sliding-window-size", "64", "--suffix-len", "6"])
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.suffix_len == 6 and model.config.num_hidden_layers == 30
    ids = AutoTokenizer.from_pretrained(out)("The capital of Italy is", return_tensors="pt").input_ids
    llama = AutoModelForCausalLM.from_pretrained(real_checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=0, atol=1e-3)
