"""Packed sequences (padding-free batches) in every model of the project: ``position_ids`` that
restart at 0 (transformers' ``DataCollatorWithFlattening``) and ``cu_seqlens`` mean the same
packing, and each packed sequence gets the logits it gets alone; plain ``position_ids`` (0..T-1, or
generate's under padding) change nothing; ``position_ids`` continuing a cache are accepted; and a
``DataCollatorWithFlattening`` batch through transformers' ``Trainer`` gives the loss and gradients of
the same sequences as a padded batch. float64, weights perturbed (tests/models/test_generation.py's
models and tolerances: 1e-10, 1e-6 for models holding Gated DeltaNet's float32 normalisation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_MIXER_OPTIONS, perturb_
from test_generation import MODELS, VOCAB, tolerance, ttt_model
from transformers import (
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from ttt_mixer.adapters import swap_mixer
from ttt_mixer.models.causal_lm import CACHE_FIELD

pytestmark = pytest.mark.compat

LENGTHS = (4, 1, 6)
# The loss is computed in float32 (causal_lm_output casts the logits, as transformers does): the mean
# of n per-token terms, summed in another order, agrees to n float32 roundings (measured: 1.3e-7
# relative for 13 targets). Its gradient at the logits is float32 too, so the parameter gradients
# (at most ~1 here) agree to float32 rounding of those terms (measured: 1.2e-10; 1e-16 where the two
# layouts give bit-equal logits)
FLOAT32_EPS = 2**-23
GRADIENT_ATOL = 1e-7


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return MODELS[request.param]()


def sequences(lengths: tuple[int, ...] = LENGTHS, seed: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=generator) for length in lengths]


def offsets(lengths: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def alone_logits(model: PreTrainedModel, sequence: torch.Tensor) -> torch.Tensor:
    return model(sequence[None], use_cache=False).logits[0]


def test_packed_sequences_give_each_sequence_alone(model: PreTrainedModel) -> None:
    """One row of three sequences, packed by position_ids resets, by cu_seqlens and by both: each
    sequence's logits are its own; cu_seqlens may hold an empty sequence."""
    parts = sequences()
    ids = torch.cat(parts)[None]
    position_ids = torch.cat([torch.arange(len(p)) for p in parts])[None]
    cu_seqlens = offsets(LENGTHS)
    with torch.no_grad():
        packings = {
            "position_ids": model(ids, position_ids=position_ids).logits[0],
            "cu_seqlens": model(ids, cu_seqlens=cu_seqlens, use_cache=False).logits[0],
            "both": model(ids, position_ids=position_ids, cu_seqlens=cu_seqlens, use_cache=False).logits[0],
            "an empty sequence": model(
                ids, cu_seqlens=offsets((LENGTHS[0], 0, *LENGTHS[1:])), use_cache=False
            ).logits[0],
        }
        for start, end, part in zip(cu_seqlens[:-1], cu_seqlens[1:], parts, strict=True):
            expected = alone_logits(model, part)
            for name, logits in packings.items():
                torch.testing.assert_close(logits[start:end], expected, **tolerance(model), msg=name)


def test_plain_position_ids_change_nothing(model: PreTrainedModel) -> None:
    """0..T-1 in every row, or, under left padding, generate's position_ids (the real tokens counted,
    padding at 0), give the logits of no position_ids."""
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    generate_positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
        torch.testing.assert_close(
            model(ids, position_ids=torch.arange(7)[None], use_cache=False).logits, plain, **tolerance(model)
        )
        padded = model(ids, attention_mask=mask, use_cache=False).logits
        # padding's positions are not read: generate's 0 there, or the plain count's -1
        for positions in (generate_positions, mask.cumsum(-1) - 1):
            out = model(ids, attention_mask=mask, position_ids=positions, use_cache=False)
            torch.testing.assert_close(out.logits[mask.bool()], padded[mask.bool()], **tolerance(model))


def test_position_ids_continuing_a_cache_are_accepted(model: PreTrainedModel) -> None:
    """Prefill 5 tokens, then 2 more with position_ids 5, 6: the one-pass logits."""
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        cache = getattr(model(ids[:, :5], use_cache=True), CACHE_FIELD)
        rest = model(
            ids[:, 5:], position_ids=torch.tensor([[5, 6]] * 2), use_cache=True, **{CACHE_FIELD: cache}
        )
    torch.testing.assert_close(rest.logits, whole[:, 5:], **tolerance(model))


def hybrid_llama() -> PreTrainedModel:
    """A 4-layer Llama holding attention, TTT-Linear, GLA and Mamba-2."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    for layer, mixer in enumerate(["attention", "ttt_linear", "gla", "mamba2"]):
        model = swap_mixer(model, mixer, [layer], **TINY_MIXER_OPTIONS.get(mixer, {}))
    return perturb_(model, seed=5, scale=0.05).double()


def padded_batch(parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sequences right-padded, with the labels DataCollatorWithFlattening gives them: the tokens,
    -100 at each sequence's first token (no target across sequences) and at padding."""
    length = max(len(p) for p in parts)
    ids = torch.zeros(len(parts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, part in enumerate(parts):
        ids[row, : len(part)] = part
        mask[row, : len(part)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize(
    "build", [lambda: ttt_model("mlp", "mamba"), hybrid_llama], ids=["ttt", "llama-hybrid"]
)
def test_trainer_on_flattened_batches_gives_the_padded_loss_and_gradients(build, tmp_path: Path) -> None:
    """A ``DataCollatorWithFlattening`` batch from ``Trainer``'s dataloader (one row, position_ids
    restarting at 0) and the padded batch of the same sequences, each through ``Trainer.compute_loss``
    and backward: the same loss and the same gradient of every parameter, to the float32 rounding of
    the loss (FLOAT32_EPS, GRADIENT_ATOL)."""
    model = build()
    parts = sequences((5, 3, 7, 2), seed=9)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(parts), report_to=[], use_cpu=True
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": p.tolist()} for p in parts],
        data_collator=DataCollatorWithFlattening(),
    )
    flattened = next(iter(trainer.get_train_dataloader()))
    assert flattened["input_ids"].shape == (1, sum(len(p) for p in parts))
    assert "attention_mask" not in flattened and int((flattened["position_ids"] == 0).sum()) == len(parts)

    def loss_and_gradients(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.detach(), {
            name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
        }

    packed_loss, packed_grads = loss_and_gradients(flattened)
    padded_loss, padded_grads = loss_and_gradients(padded_batch(parts))
    targets = int((flattened["labels"] != -100).sum())
    torch.testing.assert_close(packed_loss, padded_loss, rtol=targets * FLOAT32_EPS, atol=0)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) == len(list(model.parameters()))
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=0, atol=GRADIENT_ATOL, msg=name)
