"""``ttt_mqar_twice``: ``ttt_mqar`` with the JRT prompt (Arora et al. 2024, "Just read twice"). Every
document is a ``ttt_mqar`` document whose key-value pairs come twice: ``k1 v1 ... kn vn`` and then the
whole sequence as ``ttt_mqar`` reads it (the pairs again, then the queries up to the queried key),
so a recurrent model meets the pairs a second time knowing them. Same options, choices, gold and
scores as ``ttt_mqar`` (``acc@L``, ``exact_match@L``, L the sequence's symbols without the repeat);
each document is 2 * mqar_num_kv_pairs symbols longer and must fit the model's max_length too."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .document_fit import check_choices_fit
from .recall import Tokenizer, _dataset, mqar_dataset, parse_options

if TYPE_CHECKING:
    import datasets


def read_pairs_twice(context: str, num_kv_pairs: int) -> str:
    """A ``ttt_mqar`` context with its first ``num_kv_pairs`` key-value pairs put before it again."""
    symbols = context.split(" ")
    return " ".join(symbols[: 2 * num_kv_pairs] + symbols)


def mqar_twice_dataset(tokenizer: Tokenizer | None = None, **metadata: Any) -> dict[str, datasets.Dataset]:
    """``ttt_mqar``'s documents (same seed, order and scoring), each with its pairs read twice."""
    pairs = parse_options(metadata).mqar_num_kv_pairs
    docs = mqar_dataset(tokenizer, **metadata)["test"].to_list()
    for doc in docs:
        doc["context"] = read_pairs_twice(doc["context"], pairs)
    check_choices_fit(
        docs,
        metadata,
        tokenizer,
        lambda doc, tokens, limit: (
            f"ttt_recall option 'mqar_seq_lengths': a sequence of {doc['length']} symbols with its "
            f"pairs read twice takes {tokens} tokens, more than the model's max_length {limit}; lower "
            "mqar_seq_lengths, or pass --model_args ...,max_length=N for a model that reads more"
        ),
    )
    return _dataset(docs)
