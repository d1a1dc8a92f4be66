"""The synthetic recall tasks fit the model's max_length, so that lm-eval never cuts a needle, a key
or a query away: with a byte-level BPE tokenizer that adds a BOS token (as Llama's do), every
document at a context length equal to max_length fits as lm-eval encodes it (the prompt plus the
tokens lm-eval keeps free to generate; an MQAR context plus each choice), lengths that cannot fit
are ValueErrors naming the option and the model's max_length, and lm-eval's own runner, on a tiny
model whose config sets max_length, truncates nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from eval_models import save_checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ttt_mixer.eval_tasks import recall, tasks_path, tokens

MAX_LENGTH = 256
GEN_TOKS = {"passkey": recall.PASSKEY_MAX_GEN_TOKS, "phonebook": recall.PHONEBOOK_MAX_GEN_TOKS}
# the most tokens one filler unit takes (a filler word, a phonebook entry): a prompt fills its budget
# to within that
UNIT_TOKENS = {"passkey": 8, "phonebook": 24}


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE, its merges learned from the tasks' own text (digits, names and words
    split into several tokens), adding a BOS token to every text as Llama's tokenizers do: a prompt
    takes one token more in lm-eval than its text alone."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    book = recall.phonebook_prompt(recall.phonebook_entries(np.random.default_rng(0), 40), "Bada Kelo")
    passkey = recall.passkey_prompt("12345", 200, 0.5)
    tokenizer.train_from_iterator([passkey, book, " ".join(recall.MQAR_KEYS + recall.MQAR_VALUES)], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


TOKENIZER = byte_level_tokenizer()


def input_tokens(text: str) -> int:
    """Tokens lm-eval's hf model feeds the model for ``text``: the tokenizer's BOS included."""
    return len(TOKENIZER(text).input_ids)


def test_the_tokenizer_splits_and_adds_a_bos_token() -> None:
    ids = TOKENIZER("The pass key is 40213.").input_ids
    assert ids[0] == TOKENIZER.bos_token_id and 6 < len(ids) < 22
    assert TOKENIZER.decode(ids[1:]) == "The pass key is 40213."


@pytest.mark.parametrize("task", ["passkey", "phonebook"])
def test_generation_prompts_leave_room_to_generate_within_max_length(task: str) -> None:
    build = getattr(recall, f"{task}_dataset")
    lengths = [128, MAX_LENGTH]
    docs = build(tokenizer=TOKENIZER, context_lengths=lengths, num_samples=5, max_length=MAX_LENGTH)
    docs = docs["test"].to_list()
    assert sorted({doc["length"] for doc in docs}) == lengths
    for doc in docs:
        used = input_tokens(doc["context"]) + GEN_TOKS[task]
        assert doc["length"] - UNIT_TOKENS[task] <= used <= doc["length"] <= MAX_LENGTH
        assert len(TOKENIZER(" " + doc["answer"], add_special_tokens=False).input_ids) <= GEN_TOKS[task]
        assert doc["answer"] in doc["context"]


def test_mqar_documents_fit_max_length() -> None:
    options = {"mqar_seq_lengths": [32, 48], "mqar_num_kv_pairs": 4, "num_samples": 3}
    docs = recall.mqar_dataset(tokenizer=TOKENIZER, max_length=MAX_LENGTH, **options)["test"].to_list()
    longest = max(input_tokens(f"{doc['context']} {choice}") for doc in docs for choice in doc["choices"])
    assert 48 < longest <= MAX_LENGTH  # a symbol is one token or more
    with pytest.raises(ValueError, match=rf"'mqar_seq_lengths'.*{longest}.*max_length {longest - 1}"):
        recall.mqar_dataset(tokenizer=TOKENIZER, max_length=longest - 1, **options)


@pytest.mark.parametrize(
    ("build", "lengths", "message"),
    [
        (
            recall.passkey_dataset,
            [128, MAX_LENGTH + 1],
            rf"\[{MAX_LENGTH + 1}\] above the model's max_length",
        ),
        (recall.phonebook_dataset, [MAX_LENGTH * 2], rf"\[{MAX_LENGTH * 2}\] above the model's max_length"),
        # room for the prompt without filler, not for it and the tokens generated
        (recall.passkey_dataset, [40], r"\[40\] below \d+ tokens"),
        (recall.phonebook_dataset, [60], r"\[60\] below \d+ tokens"),
    ],
)
def test_lengths_that_cannot_fit_are_refused(build, lengths: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=rf"'context_lengths': {message}"):
        build(tokenizer=TOKENIZER, context_lengths=lengths, num_samples=1, max_length=MAX_LENGTH)


def test_generation_tokens_match_the_task_configs() -> None:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    for task, max_gen_toks in GEN_TOKS.items():
        config = yaml.load(Path(tasks_path(), f"ttt_{task}.yaml").read_text(), Loader=Loader)
        assert config["generation_kwargs"]["max_gen_toks"] == max_gen_toks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose config limits lm-eval to MAX_LENGTH tokens, with the byte-level tokenizer."""
    config = LlamaConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=TOKENIZER.bos_token_id,
        eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id,
    )
    torch.manual_seed(0)
    return save_checkpoint(LlamaForCausalLM(config).eval(), TOKENIZER, tmp_path_factory.mktemp("llama"))


def test_model_max_length_is_lm_evals(checkpoint: Path) -> None:
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(checkpoint), device="cpu")
    assert tokens.model_max_length({"pretrained": str(checkpoint)}, TOKENIZER) == lm.max_length == MAX_LENGTH
    assert tokens.model_max_length({"pretrained": str(checkpoint), "max_length": "100"}) == 100
    assert tokens.model_max_length({"tokenizer": "x"}) is None  # no model config to read
    with pytest.raises(ValueError, match="'max_length'"):
        tokens.model_max_length({"max_length": 0})
    # lm-eval encodes a prompt as the task counts it
    prompt = recall.passkey_dataset(tokenizer=TOKENIZER, context_lengths=[128], num_samples=1)["test"][0]
    assert lm.tok_batch_encode([prompt["context"]])[0].shape[1] == input_tokens(prompt["context"])


@pytest.mark.slow  # lm-eval's runner on a model
@pytest.mark.compat
def test_lm_eval_truncates_nothing_at_max_length(checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    metadata = {
        "context_lengths": [MAX_LENGTH],
        "mqar_seq_lengths": [48],
        "mqar_num_kv_pairs": 4,
        "num_samples": 2,
        "passkey_depths": [0.0],  # the needle first: what a cut would remove
    }
    model_args = {"pretrained": str(checkpoint)}
    # the task metadata of lm-eval's command line: the model's arguments, then --metadata
    tasks = TaskManager(include_path=tasks_path(), metadata=model_args | metadata)
    with caplog.at_level(logging.WARNING):
        results = simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=["ttt_passkey", "ttt_phonebook", "ttt_mqar"],
            task_manager=tasks,
            limit=2,
            device="cpu",
            batch_size=2,
        )["results"]
    assert {"ttt_passkey", "ttt_phonebook", "ttt_mqar"} <= set(results)
    assert f"exact_match@{MAX_LENGTH},none" in results["ttt_passkey"]
    cut = [r.message for r in caplog.records if "truncat" in r.message.lower()]
    assert cut == []
