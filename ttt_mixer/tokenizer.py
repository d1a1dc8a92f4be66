"""A byte-level tokenizer made in code, for models trained on raw bytes (``ttt-mixer demo``, the
README's examples): token ``b`` is byte ``b`` (0-255), so any text encodes, and ``<eos>`` (256) ends
a document and pads a batch. Saved beside a model, it lets every command that reads a checkpoint
(``ttt-mixer eval``, ``distill``) and lm-eval tokenize text without the hub."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

EOS = "<eos>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """257 tokens: the 256 bytes (id = byte value), then ``<eos>``, which is also the pad token. A
    byte-level BPE without merges: tokenizers' ByteLevel pre-tokenizer turns each byte into one
    printable character (GPT-2's table), which the vocabulary maps back to the byte's value."""
    characters = bytes_to_unicode()  # byte value -> the character ByteLevel writes for it
    vocab = {characters[byte]: byte for byte in range(256)} | {EOS: 256}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


# what transformers' AutoTokenizer reads from a folder (a fast tokenizer, or a slow one's files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer that AutoTokenizer can read."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def save_source_tokenizer(source: str, destination: Path) -> None:
    """Save the tokenizer of the checkpoint ``source`` beside the model saved in ``destination``:
    a folder's own, or a Hub model id's, fetched as transformers fetches the model (from the local
    cache, downloading what is missing unless offline); a line that says so when the source has
    none."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download  # a Hub id: its tokenizer files alone

        folder = Path(snapshot_download(source, allow_patterns=list(TOKENIZER_FILES)))
    if not has_tokenizer(folder):
        print(f"{source} has no tokenizer: none saved beside the model")
        return
    AutoTokenizer.from_pretrained(source).save_pretrained(destination)


def require_tokenizer(folder: str, what: str) -> None:
    """ValueError, in one line with the fix, when ``folder`` is a local checkpoint without a tokenizer
    (transformers would instead blame a missing sentencepiece or tiktoken). A hub name is left to
    transformers."""
    path = Path(folder)
    if path.is_dir() and not has_tokenizer(path):
        raise ValueError(
            f"{what} {folder} has no tokenizer: save one beside the model, e.g. "
            f"ttt_mixer.tokenizer.byte_tokenizer().save_pretrained('{folder}') for a byte-level model "
            "(ttt-mixer demo --save does), or the original model's tokenizer"
        )
