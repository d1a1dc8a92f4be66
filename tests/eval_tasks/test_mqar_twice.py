"""``ttt_mqar_twice`` (``eval_tasks/recall.py``): ``ttt_mqar``'s documents with the key-value
pairs given twice before the queries, nothing else changed, and the longer documents held to the
model's max_length."""

from __future__ import annotations

import pytest
from eval_models import character_tokenizer

from ttt_mixer.eval_tasks import recall
from ttt_mixer.eval_tasks.recall import mqar_twice_dataset, read_pairs_twice

TOKENIZER = character_tokenizer()
OPTIONS = {"mqar_seq_lengths": [16, 32], "mqar_num_kv_pairs": 3, "num_samples": 4}


def test_each_document_is_the_mqar_one_with_its_pairs_first_again() -> None:
    once = recall.mqar_dataset(tokenizer=TOKENIZER, **OPTIONS)["test"].to_list()
    twice = mqar_twice_dataset(tokenizer=TOKENIZER, **OPTIONS)["test"].to_list()
    assert len(once) == len(twice) == 4 * 3 * 2
    for doc, doc_twice in zip(once, twice, strict=True):
        symbols, symbols_twice = doc["context"].split(), doc_twice["context"].split()
        pairs = symbols[:6]
        assert symbols_twice == pairs + symbols
        # the repeated pairs are the sequence's: its values are the choices, the queried key (the
        # context's last symbol) is bound to the gold one
        assert pairs[1::2] == doc["choices"] and pairs[0::2][doc["gold"]] == symbols[-1]
        assert {k: v for k, v in doc.items() if k != "context"} == {
            k: v for k, v in doc_twice.items() if k != "context"
        }
    assert read_pairs_twice("ab nn cd oo ab", 2) == "ab nn cd oo ab nn cd oo ab"


def test_a_document_that_fits_once_but_not_twice_is_refused() -> None:
    once = recall.mqar_dataset(tokenizer=TOKENIZER, max_length=96, **{**OPTIONS, "mqar_seq_lengths": [32]})
    longest = max(len(TOKENIZER(f"{d['context']} {c}").input_ids) for d in once["test"] for c in d["choices"])
    assert longest <= 96
    with pytest.raises(ValueError, match="pairs read twice takes"):
        mqar_twice_dataset(tokenizer=TOKENIZER, max_length=longest, **{**OPTIONS, "mqar_seq_lengths": [32]})
