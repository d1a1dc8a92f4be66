"""MQAR and set-disjointness training data and the word-level tokenizer, built in code.

Sequences come from the evaluation task's own generator (:func:`ttt_mixer.eval_tasks.recall.mqar_sequence`),
and the tokenizer maps every MQAR symbol to one token and splits on whitespace, so a training sequence
is exactly the token sequence lm-eval reads for the task's ``" ".join(symbols)`` contexts. Training
draws from a different seed than the task (which uses ``recall.OPTION_DEFAULTS["seed"]``), so no
evaluation sequence is seen in training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ttt_mixer.eval_tasks import recall
from ttt_mixer.eval_tasks import set_disjointness as task
from ttt_mixer.recall_gap.set_disjointness import SET_DISJOINTNESS_VOCAB, SetDisjointnessShape
from ttt_mixer.recall_gap.vocabulary import IGNORE_INDEX, VOCAB


def mqar_tokenizer() -> PreTrainedTokenizerFast:
    """One token per MQAR symbol (the two-letter keys and values), split on whitespace; no BOS."""
    return word_tokenizer(VOCAB)


def word_tokenizer(vocab: Mapping[str, int]) -> PreTrainedTokenizerFast:
    """One token per word of ``vocab`` (which starts with ``SPECIAL_TOKENS``), split on whitespace;
    no BOS."""
    tokenizer = Tokenizer(models.WordLevel(dict(vocab), unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def encode_example(
    rng: np.random.Generator, seq_len: int, num_kv_pairs: int, power_a: float
) -> dict[str, torch.Tensor]:
    """One MQAR sequence as ``input_ids`` and ``labels`` for a causal LM that shifts labels itself:
    the value bound to each queried key is the label one position after the key (the model predicts
    it from the key), every other label is ignored, as Zoology trains."""
    sequence = recall.mqar_sequence(rng, seq_len, num_kv_pairs, power_a)
    input_ids = torch.tensor([VOCAB[s] for s in sequence.symbols])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for position, answer in zip(sequence.query_positions, sequence.answers, strict=True):
        labels[position + 1] = VOCAB[answer]  # query slots end two before the sequence does
    return {"input_ids": input_ids, "labels": labels}


class MQARDataset(torch.utils.data.Dataset):
    """``size`` MQAR training sequences, example ``i`` drawn from its own RNG seeded with
    ``(seed, i)``: the same data in any order, on any number of processes, after any resume.
    ``num_kv_pairs`` with several entries cycles through them (example ``i`` uses entry
    ``i % len``), a mixture of difficulties in every batch."""

    def __init__(
        self,
        size: int,
        seq_len: int,
        num_kv_pairs: int | Sequence[int],
        seed: int,
        power_a: float = recall.OPTION_DEFAULTS["mqar_power_a"],
    ) -> None:
        pairs = (num_kv_pairs,) if isinstance(num_kv_pairs, int) else tuple(num_kv_pairs)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not pairs or min(pairs) < 1:
            raise ValueError(f"num_kv_pairs must be positive integers, got {num_kv_pairs!r}")
        if seq_len < recall.mqar_min_length(max(pairs)):
            raise ValueError(
                f"seq_len {seq_len} is below 4 * num_kv_pairs = {recall.mqar_min_length(max(pairs))}, "
                "the shortest MQAR sequence that holds the pairs and their queries"
            )
        self.size, self.seq_len, self.pairs, self.seed, self.power_a = size, seq_len, pairs, seed, power_a

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        return encode_example(rng, self.seq_len, self.pairs[index % len(self.pairs)], self.power_a)


def encode_set_disjointness_example(
    rng: np.random.Generator, length: int, first_fraction: float
) -> dict[str, torch.Tensor]:
    """One document and its answer as ``input_ids`` and ``labels`` for a causal LM that shifts labels
    itself: the shared symbol is the last token and the one label, every other label is ignored."""
    first, second, shared = task.sets(rng, length, first_fraction)
    tokens = [*task.prompt(first, second, twice=False).split(), shared]
    input_ids = torch.tensor([SET_DISJOINTNESS_VOCAB[token] for token in tokens])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[-1] = input_ids[-1]
    return {"input_ids": input_ids, "labels": labels}


class SetDisjointnessDataset(torch.utils.data.Dataset):
    """``size`` training documents of one shape, example ``i`` drawn from its own RNG seeded with
    ``(seed, i)``: the same data in any order, on any number of processes, after any resume."""

    def __init__(self, size: int, shape: SetDisjointnessShape, seed: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.shape, self.seed = size, shape, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        return encode_set_disjointness_example(rng, self.shape.seq_len, self.shape.first_fraction)
