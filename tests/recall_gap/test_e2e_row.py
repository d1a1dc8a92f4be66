"""The recall gap's TTT-E2E row (``ttt_e2e``): its own table of model rows beside the registry's
mixers, the run the plan makes for it, the model built for it (the preset's sizes, a window shorter
than the training sequence, an inner loop that steps within it), training through the inner steps,
its state-size rule against the model's real cache, a few training steps through the recall gap's
Trainer, and (slow) the command's run of the row through lm-eval."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ttt_mixer.adapters import MIXER_NAMES
from ttt_mixer.e2e import E2EConfig, E2EForCausalLM
from ttt_mixer.models.causal_lm import CACHE_FIELD
from ttt_mixer.recall_gap import DESCRIPTION, add_arguments, main
from ttt_mixer.recall_gap.data import MQARDataset
from ttt_mixer.recall_gap.evaluate import StateSize, e2e_state_size, state_size
from ttt_mixer.recall_gap.presets import (
    ALL_MIXERS,
    CPU,
    E2E_RECALL,
    RECALL_GAP_MODELS,
    ROW_NAMES,
    ZOOLOGY_GPU,
    MQARShape,
)
from ttt_mixer.recall_gap.report import TABLE_JSON
from ttt_mixer.recall_gap.runner import RELATIVE_CPU_COST, plan
from ttt_mixer.recall_gap.train import MODEL_DIR, MODEL_ROWS, RunSpec, build_model, train_run
from ttt_mixer.recall_gap.vocabulary import EOS_ID, PAD_ID, VOCAB


def tiny_spec(steps: int = 2, **options: object) -> RunSpec:
    """A ttt_e2e run of width 16 on MQAR L16-kv2, batches of 2."""
    shape = MQARShape(16, 2)
    return RunSpec("ttt_e2e", 16, 2, 1, shape, steps, 2, 1e-2, 0, 32, {**E2E_RECALL, **options})


def test_model_rows_are_one_table_beside_the_mixers_and_the_command_line_offers_them() -> None:
    assert not set(RECALL_GAP_MODELS) & set(MIXER_NAMES)
    assert set(MODEL_ROWS) == set(RECALL_GAP_MODELS)
    assert (*ALL_MIXERS, *RECALL_GAP_MODELS) == ROW_NAMES
    for name, recipe in RECALL_GAP_MODELS.items():
        assert 0 < recipe.cpu_learning_rate < 1 and recipe.relative_cpu_cost > 0 and recipe.description
        assert CPU.learning_rates[name] == recipe.cpu_learning_rate
        assert RELATIVE_CPU_COST[name] == recipe.relative_cpu_cost
        assert CPU.mixer_options[name] == ZOOLOGY_GPU.mixer_options[name] == recipe.options
        # over the CPU default's 10 minutes (docs/recall_gap.md): behind --mixers
        assert name not in CPU.mixers and name in DESCRIPTION
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--mixers", "attention,ttt_e2e"])
    assert args.mixers == ("attention", "ttt_e2e")


def test_the_plan_gives_ttt_e2e_the_budget_of_the_other_rows() -> None:
    attention, e2e = plan(dataclasses.replace(CPU, mixers=("attention", "ttt_e2e")), [0])
    assert e2e.mixer == "ttt_e2e" and dict(e2e.mixer_options) == E2E_RECALL
    assert e2e.learning_rate == RECALL_GAP_MODELS["ttt_e2e"].cpu_learning_rate
    same = ("width", "num_layers", "num_heads", "train_shape", "steps", "batch_size", "seed", "max_length")
    assert all(getattr(e2e, field) == getattr(attention, field) for field in same)


def test_the_e2e_model_has_the_presets_sizes_and_learns_within_a_training_sequence() -> None:
    (spec,) = plan(dataclasses.replace(CPU, mixers=("ttt_e2e",)), [0])
    model = build_model(spec)
    config = model.config
    assert isinstance(model, E2EForCausalLM)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 1)
    assert config.vocab_size == len(VOCAB) and (config.pad_token_id, config.eos_token_id) == (PAD_ID, EOS_ID)
    # no BOS: the inner loss would skip every target equal to it
    assert config.bos_token_id is None and not config.tie_word_embeddings
    seq_len = spec.train_shape.seq_len
    assert config.sliding_window_size < seq_len and 1 <= config.suffix_len < config.num_hidden_layers
    # inner steps within one training sequence (the last mini-batch has no next token to learn from)
    assert (seq_len - 1) // config.mini_batch_size >= 3
    # the first mini-batch holds exactly the pairs, learned from before the first query
    assert config.mini_batch_size == 2 * spec.train_shape.num_kv_pairs


@pytest.mark.parametrize("inner_lr", [1.0, 0.0])
def test_training_differentiates_through_the_inner_steps(inner_lr: float) -> None:
    """The first token is out of every later token's attention (two layers of windows of 2 reach
    back 2 tokens) from position 3 on, so the logits from position 8 on depend on it only through the
    inner steps it took part in: its embedding gets a gradient from them exactly when the outer
    gradient runs through those steps (meta-learning), and none without inner steps."""
    model = build_model(tiny_spec(sliding_window_size=2, mini_batch_size=4, inner_lr=inner_lr)).train()
    first = 3
    tokens = torch.arange(first, first + 16)[None]  # distinct ids: the first token's row is its own
    logits = model(tokens).logits[:, 8:]
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    reached = model.model.embeddings.weight.grad[first].abs().max().item()
    assert reached > 0 if inner_lr else reached == 0


def test_a_window_as_long_as_the_training_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sliding_window_size must be below the training length 16"):
        tiny_spec(sliding_window_size=16)


def test_the_state_size_rule_counts_the_models_cache() -> None:
    """The rule against the tensors of a real cache after a sequence that fills the window and
    leaves a full mini-batch pending (32 tokens, mini-batches of 8): keys and values, inner weights,
    pending inputs and ids (not the masks and counters)."""
    torch.manual_seed(0)
    config = E2EConfig(
        vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=3, num_attention_heads=2,
        mini_batch_size=8, sliding_window_size=5, suffix_len=2, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = E2EForCausalLM(config).eval()
    with torch.no_grad():
        cache = getattr(model(torch.randint(11, (1, 32)), use_cache=True), CACHE_FIELD)
    numbers = 0
    for i in range(config.num_hidden_layers):
        keys, values, _real, _seen, *inner = cache[i]["recurrent_state"]
        numbers += keys.numel() + values.numel() + sum(w.numel() for w in inner)
    pending_x, pending_ids, pending_count = cache[config.num_hidden_layers - 1]["ffn_state"]
    assert pending_count.tolist() == [8]
    numbers += pending_x.numel() + pending_ids.numel()
    # 3 windows of 4 tokens' keys and values, 2 inner MLPs, 8 pending inputs and ids
    assert numbers == e2e_state_size(config) == 3 * 2 * 4 * 8 + 2 * 3 * 12 * 8 + 8 * 9
    assert state_size(model, 32) == StateSize(e2e_state_size(config))


def test_a_few_steps_train_through_the_inner_loop_and_save_a_model_that_reloads(tmp_path: Path) -> None:
    spec = tiny_spec(mini_batch_size=4)
    before = build_model(spec).model.layers[1].feed_forward_prime.gate_proj.weight.detach().clone()
    assert train_run(spec, tmp_path, save_steps=2, progress_bars=False).final_loss is not None
    model = AutoModelForCausalLM.from_pretrained(tmp_path / MODEL_DIR, trust_remote_code=True)
    assert isinstance(model, E2EForCausalLM)
    # the inner model's start is an outer parameter: trained
    assert not torch.equal(model.model.layers[1].feed_forward_prime.gate_proj.weight, before)
    batch = MQARDataset(1, 16, 2, 0)[0]
    with torch.no_grad():
        assert torch.isfinite(model(batch["input_ids"][None]).logits).all()


@pytest.mark.slow
def test_the_command_trains_the_row_and_evaluates_it_through_lm_eval(tmp_path: Path) -> None:
    out = tmp_path / "out"
    main(
        [
            *("--out", str(out), "--mixers", "ttt_e2e", "--widths", "16", "--heads", "1"),
            *("--steps", "2", "--batch-size", "2", "--seq-len", "16", "--kv-pairs", "2"),
            *("--length-factors", "1,2", "--eval-samples", "2", "--jobs", "1"),
        ]
    )
    data = json.loads((out / TABLE_JSON).read_text())
    (row,) = data["rows"]
    model = AutoModelForCausalLM.from_pretrained(row["checkpoint"], trust_remote_code=True)
    assert isinstance(model, E2EForCausalLM) and model.config.hidden_size == 16
    assert row["state_size"] == e2e_state_size(model.config) and not row["state_grows_with_length"]
    assert set(row["accuracy"]) == set(row["accuracy_twice"]) == {"L16-kv2", "L32-kv2", "L32-kv4"}
    lm_eval_results = json.loads((Path(row["checkpoint"]).parent / "lm_eval_results.json").read_text())
    assert set(lm_eval_results["results"]) == {
        f"{task}_kv{pairs}" for task in ("ttt_mqar", "ttt_mqar_twice") for pairs in (2, 4)
    }
    assert "ttt_e2e is a model of its own" in data["summary"]
