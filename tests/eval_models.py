"""Tiny checkpoints for the lm-eval tests: a TTT model or a Llama (attention) on a character
tokenizer, saved with the tokenizer, as ``lm_eval --model hf`` loads them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import subprocess_env
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from ttt_mixer import TTTConfig, TTTForCausalLM

MODEL_KINDS = ("ttt", "llama")


def character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (and newline), plus pad, eos and unk."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for char in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(kind: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """A seeded 2-layer, width-32 causal LM: TTT (Mamba backbone) or Llama."""
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    sizes = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    torch.manual_seed(seed)
    if kind == "ttt":
        config = TTTConfig(**sizes, **special, num_attention_heads=2, mini_batch_size=4, backbone="mamba")
        return TTTForCausalLM(config).eval()
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**sizes, **special, num_attention_heads=2)).eval()
    raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_lm_eval(args: list[str], cwd: Path, module: tuple[str, ...] = ("lm_eval",)) -> Path:
    """``python -m lm_eval ARGS`` (or another module, e.g. ``ttt_mixer.cli eval``) offline, results
    written under ``cwd/out``; fails the test with lm-eval's stderr on error. Returns the results file."""
    env = subprocess_env()
    command = [sys.executable, "-m", *module, *args, "--output_path", str(cwd / "out")]
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (cwd / "out").rglob("results*.json")
    return results_file
