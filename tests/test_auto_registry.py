"""Importing ttt_mixer leaves transformers' Auto classes as they were: in a fresh interpreter,
transformers' Mamba and Mamba-2 checkpoints load as transformers' classes with the same logits as
before the import (also through lm-eval's HFLM, as ``ttt-mixer eval`` loads them), fla's own
checkpoints still load as fla's, every transformers model type maps to the config class it mapped
to before, and ttt_mixer's own registrations only add model types. ``ttt-mixer swap`` swaps a saved
transformers Mamba checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_model_outputs, subprocess_env
from eval_models import character_tokenizer
from fla.models import GLAConfig, GLAForCausalLM, GLAModel
from transformers import (
    AutoModelForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedModel,
)

from ttt_mixer import TTTConfig
from ttt_mixer.adapters import MixerLlamaConfig, MixerMambaConfig, MixerMambaForCausalLM
from ttt_mixer.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.compat]  # subprocesses

# One fresh interpreter: load each checkpoint with the Auto class before and after importing the
# project (everything a user can import: the package, the adapters, the lm-eval tasks and
# ``ttt-mixer eval``'s module), then load it as ``ttt-mixer eval --model hf`` does (lm-eval's HFLM).
LOAD_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoModel, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

folder, checkpoints = Path(sys.argv[1]), sys.argv[2:]
ids = torch.load(folder / "ids.pt")

def name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"

def load(checkpoint):
    return AutoModelForCausalLM.from_pretrained(folder / checkpoint).eval()

def logits(model):
    with torch.no_grad():
        return model(ids).logits

report = {"types_before": {t: name(CONFIG_MAPPING[t]) for t in CONFIG_MAPPING_NAMES}}
report["before"] = {}
for checkpoint in checkpoints:
    if json.loads((folder / checkpoint / "config.json").read_text())["model_type"] not in CONFIG_MAPPING_NAMES:
        continue  # another library's checkpoint: transformers alone cannot load it
    model = load(checkpoint)
    report["before"][checkpoint] = name(type(model))
    torch.save(logits(model), folder / f"{checkpoint}-before.pt")

import ttt_mixer, ttt_mixer.adapters, ttt_mixer.eval_tasks, ttt_mixer.evaluation  # noqa: E401

report["types_after"] = {t: name(CONFIG_MAPPING[t]) for t in CONFIG_MAPPING_NAMES}
report["added_types"] = sorted(set(CONFIG_MAPPING.keys()) - set(CONFIG_MAPPING_NAMES))
report["after"], report["auto_model"] = {}, {}
for checkpoint in checkpoints:
    model = load(checkpoint)
    report["after"][checkpoint] = name(type(model))
    if checkpoint in report["before"]:  # (fla's models run Triton kernels, which need a GPU)
        torch.save(logits(model), folder / f"{checkpoint}-after.pt")
    report["auto_model"][checkpoint] = name(type(AutoModel.from_pretrained(folder / checkpoint)))

from lm_eval.models.huggingface import HFLM

report["hflm"] = {}
for checkpoint in checkpoints:
    if (folder / checkpoint / "tokenizer_config.json").exists():
        lm = HFLM(pretrained=str(folder / checkpoint), device="cpu", batch_size=1)
        report["hflm"][checkpoint] = name(type(lm.model))
        torch.save(logits(lm.model), folder / f"{checkpoint}-hflm.pt")
print(json.dumps(report))
"""

# The same comparison when the user imported fla first: that was their choice, and it stays.
FLA_FIRST_SCRIPT = r"""
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
import fla, ttt_mixer  # noqa: E401
print(CONFIG_MAPPING["mamba"].__module__)
"""

VOCAB = len(character_tokenizer())


def tiny_mamba(seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2)
    return MambaForCausalLM(config).eval()


def tiny_mamba2(seed: int = 0) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    config = Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        expand=2,
        num_heads=4,
        head_dim=16,
        n_groups=1,
        state_size=8,
        chunk_size=4,
        num_hidden_layers=2,
    )
    return Mamba2ForCausalLM(config).eval()


def tiny_gla(seed: int = 0) -> GLAForCausalLM:
    torch.manual_seed(seed)
    config = GLAConfig(vocab_size=VOCAB, hidden_size=32, num_heads=2, num_hidden_layers=2)
    return GLAForCausalLM(config).eval()


def save(model: PreTrainedModel, path: Path, with_tokenizer: bool = True) -> Path:
    model.save_pretrained(path)
    if with_tokenizer:
        character_tokenizer().save_pretrained(path)
    return path


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The checkpoints' folder and the fresh interpreter's report (LOAD_SCRIPT)."""
    folder = tmp_path_factory.mktemp("auto-registry")
    save(tiny_mamba(), folder / "mamba")
    save(tiny_mamba2(), folder / "mamba2")
    save(tiny_gla(), folder / "gla", with_tokenizer=False)
    torch.save(
        torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)), folder / "ids.pt"
    )
    command = [sys.executable, "-c", LOAD_SCRIPT, str(folder), "mamba", "mamba2", "gla"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("checkpoint", "expected"), [("mamba", MambaForCausalLM), ("mamba2", Mamba2ForCausalLM)]
)
def test_transformers_mamba_checkpoints_load_as_transformers_classes(
    loaded: tuple[Path, dict], checkpoint: str, expected: type
) -> None:
    folder, report = loaded
    for when in ("before", "after", "hflm"):
        assert report[when][checkpoint] == class_name(expected), when
    assert report["auto_model"][checkpoint] == class_name(expected).replace("ForCausalLM", "Model")
    before = torch.load(folder / f"{checkpoint}-before.pt")
    for when in ("after", "hflm"):  # another instance of the same model
        assert_same_model_outputs(torch.load(folder / f"{checkpoint}-{when}.pt"), before)


def test_fla_checkpoints_still_load_as_fla_classes(loaded: tuple[Path, dict]) -> None:
    _, report = loaded
    assert report["after"]["gla"] == class_name(GLAForCausalLM)
    assert report["auto_model"]["gla"] == class_name(GLAModel)


def test_every_transformers_model_type_keeps_its_config_class(loaded: tuple[Path, dict]) -> None:
    _, report = loaded
    before, after = report["types_before"], report["types_after"]
    assert {t: after[t] for t in before if after[t] != before[t]} == {}
    assert all(name.startswith("transformers.") for name in before.values())
    # ttt_mixer's own registrations add model types (fla's too), none of transformers' own
    ours = {config.model_type for config in (TTTConfig, MixerLlamaConfig, MixerMambaConfig, GLAConfig)}
    assert ours <= set(report["added_types"])


def test_fla_imported_first_keeps_fla_mapping() -> None:
    command = [sys.executable, "-c", FLA_FIRST_SCRIPT]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "fla.models.mamba.configuration_mamba"


def test_swap_command_takes_a_transformers_mamba_checkpoint(tmp_path: Path) -> None:
    source = save(tiny_mamba(), tmp_path / "mamba")
    main(["swap", str(source), str(tmp_path / "swapped"), "--mixer", "ttt_linear", "--layers", "0"])
    swapped = AutoModelForCausalLM.from_pretrained(tmp_path / "swapped", trust_remote_code=True)
    assert isinstance(swapped, MixerMambaForCausalLM)
    assert swapped.config.mixers == ["ttt_linear", "mamba"]
