"""The mixer registry (``ttt_mixer.adapters.mixers.registry``) is the one list of mixers: every entry
provides what the project reads of a mixer, and every other list (``MIXER_NAMES``, the command lines'
choices, the recall gap's table, the README's table) equals it.

What an entry must provide, checked for every entry:
- a name (a lowercase identifier) and a one-line description (no table separator);
- a layer class, named by module path (where it initialises parameters specially, its
  ``reset_parameters``, which a backbone's init reruns: tests/adapters/test_mixer_init.py checks every
  entry's start in models);
- a builder (its own, or the layer's constructor) that builds that class in every backbone it names,
  at a tiny size, and runs;
- option checks: an unknown option is a TypeError naming the mixer;
- a state-size rule that gives a positive int, or None for a cache that grows (attention only);
- how it starts from the attention it replaces, or None: swap_mixer(init="attention") follows it and
  refuses the entries without one;
- a row in the recall gap's table whose options build the mixer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from conftest import TINY_MIXER_OPTIONS
from torch import nn

from ttt_mixer.adapters import (
    MIXER_NAMES,
    MixerLlamaConfig,
    MixerLlamaForCausalLM,
    MixerMamba2Config,
    MixerMambaConfig,
    build_mixer,
    recurrent_state_size,
    swap_mixer,
)
from ttt_mixer.adapters.mixers.registry import (
    ATTENTION_STARTS,
    BACKBONES,
    GROWS_WITH_LENGTH,
    MIXER_TABLE_BEGIN,
    MIXER_TABLE_END,
    MIXERS,
    MixerSpec,
    mixer_spec,
    mixer_table,
    resolve,
    spec_of,
)
from ttt_mixer.cli import add_swap_arguments
from ttt_mixer.recall_gap import DESCRIPTION
from ttt_mixer.recall_gap import add_arguments as add_recall_gap_arguments
from ttt_mixer.recall_gap.presets import (
    ALL_MIXERS,
    CPU,
    CPU_MIXER_OPTIONS,
    CPU_MIXERS,
    RECALL_GAP_MIXERS,
    RECALL_GAP_MODELS,
    ZOOLOGY_GPU,
)
from ttt_mixer.recall_gap.runner import RELATIVE_CPU_COST

README = Path(__file__).resolve().parents[2] / "README.md"
HIDDEN, HEADS, LAYERS = 32, 2, 2
entries = pytest.mark.parametrize("spec", MIXERS, ids=[spec.name for spec in MIXERS])


def tiny_backbone_config(
    backbone: str, mixer: str
) -> MixerLlamaConfig | MixerMambaConfig | MixerMamba2Config:
    """A tiny config of ``backbone`` with ``mixer`` in every layer (the heads a layer gets: the
    config's num_attention_heads or num_heads, HEADS here)."""
    fields = {
        "vocab_size": 50,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "mixers": [mixer] * LAYERS,
    }
    if backbone == "llama":
        return MixerLlamaConfig(**fields, intermediate_size=64, num_attention_heads=HEADS)
    if backbone == "mamba":
        return MixerMambaConfig(**fields, num_heads=HEADS, state_size=8)
    return MixerMamba2Config(
        **fields, num_heads=HEADS, head_dim=2 * HIDDEN // HEADS, n_groups=1, state_size=8
    )


def test_the_registry_lists_each_mixer_once_and_mixer_names_follow_it() -> None:
    names = [spec.name for spec in MIXERS]
    assert len(set(names)) == len(names)
    assert tuple(names) == MIXER_NAMES
    assert all(mixer_spec(name).name == name for name in names)
    with pytest.raises(ValueError, match="unknown mixer 'transformer'") as error:
        mixer_spec("transformer")
    assert all(name in str(error.value) for name in names)


@entries
def test_an_entry_names_and_describes_its_mixer(spec: MixerSpec) -> None:
    assert spec.name.isidentifier() and spec.name == spec.name.lower()
    assert spec.description and "\n" not in spec.description and "|" not in spec.description
    assert issubclass(spec.layer_class, nn.Module)
    assert spec.backbones and set(spec.backbones) <= set(BACKBONES)


@entries
def test_an_entry_names_code_that_exists(spec: MixerSpec) -> None:
    """Its layer class and builder are ``"module:name"`` references, imported when used."""
    assert isinstance(resolve(spec.layer), type)
    assert spec.builder is None or callable(resolve(spec.builder))
    assert callable(resolve(spec.state_size))
    assert spec.from_attention is None or spec.from_attention in ATTENTION_STARTS


@entries
def test_an_entry_checks_its_options(spec: MixerSpec) -> None:
    with pytest.raises(TypeError, match=rf"mixer '{spec.name}': bad options \['no_such_option'\]"):
        build_mixer(spec.name, HIDDEN, HEADS, 0, None, no_such_option=1)


@entries
def test_an_entry_starts_from_attention_as_it_says(spec: MixerSpec) -> None:
    """swap_mixer(init="attention") in a tiny Llama: "copy" keeps the attention's weights, and
    "projections" its value and output projections (whose rows need no reordering); an entry
    without a start from attention is refused."""
    torch.manual_seed(0)
    llama = MixerLlamaForCausalLM(tiny_backbone_config("llama", "attention"))
    options = TINY_MIXER_OPTIONS.get(spec.name, {})
    if spec.from_attention is None:
        with pytest.raises(ValueError, match="init='attention' supports mixers"):
            swap_mixer(llama, spec.name, init="attention", **options)
        return
    swapped = swap_mixer(llama, spec.name, init="attention", **options)
    old, new = llama.model.layers[0].self_attn, swapped.model.layers[0].self_attn
    assert type(new) is spec.layer_class
    if spec.from_attention == "copy":
        new_state = new.state_dict()
        assert all(torch.equal(value, new_state[key]) for key, value in old.state_dict().items())
    else:
        assert torch.equal(new.v_proj.weight, old.v_proj.weight)
        assert torch.equal(new.o_proj.weight, old.o_proj.weight)


@entries
def test_an_entry_builds_its_mixer_in_every_backbone_it_names(spec: MixerSpec) -> None:
    """At a tiny size, in a tiny config of each backbone (as the model builds its layers): the
    entry's class, at the layer index given, mapping [B, T, D] to [B, T, D]; the state-size rule
    gives a positive int, or None for attention alone."""
    options = TINY_MIXER_OPTIONS.get(spec.name, {})
    for backbone in spec.backbones:
        config = tiny_backbone_config(backbone, spec.name)
        torch.manual_seed(0)
        mixer = spec.build(HIDDEN, HEADS, 1, config, dict(options))
        assert type(mixer) is spec.layer_class, backbone
        assert mixer.layer_idx == 1
        hidden = torch.randn(2, 5, HIDDEN)
        output = mixer(hidden)[0]
        assert output.shape == hidden.shape and torch.isfinite(output).all(), backbone
        assert spec_of(mixer).state_size == spec.state_size
        size = recurrent_state_size(mixer)
        if spec.state_size == GROWS_WITH_LENGTH:
            assert size is None
        else:
            assert isinstance(size, int) and size > 0, (backbone, size)
    assert [s.name for s in MIXERS if s.state_size == GROWS_WITH_LENGTH] == ["attention"]


def test_entries_of_one_layer_class_share_its_state_size_rule_and_other_modules_have_none() -> None:
    """``recurrent_state_size`` finds a mixer's entry by its class (Titans and LaCT share one)."""
    for spec in MIXERS:
        assert all(other.state_size == spec.state_size for other in MIXERS if other.layer == spec.layer)
    with pytest.raises(TypeError, match=r"registered mixers .* got Linear"):
        recurrent_state_size(nn.Linear(4, 4))


def test_the_recall_gap_has_a_row_for_every_mixer_whose_options_build_it() -> None:
    """The recall gap's own table (rates, costs, options: the recall gap's, not the adapters') is
    keyed by the registry's names; its presets and runner read it."""
    assert set(RECALL_GAP_MIXERS) == set(MIXER_NAMES)
    assert ALL_MIXERS == tuple(RECALL_GAP_MIXERS) == ZOOLOGY_GPU.mixers
    assert CPU.mixers == CPU_MIXERS == tuple(n for n, r in RECALL_GAP_MIXERS.items() if r.in_cpu_default)
    # (and the model rows beside the mixers: tests/recall_gap/test_e2e_row.py)
    assert set(CPU.learning_rates) == set(RELATIVE_CPU_COST) == {*MIXER_NAMES, *RECALL_GAP_MODELS}
    width, heads = CPU.widths[0], CPU.num_heads
    for name, recipe in RECALL_GAP_MIXERS.items():
        assert 0 < recipe.cpu_learning_rate < 1 and recipe.relative_cpu_cost > 0, name
        assert CPU.learning_rates[name] == recipe.cpu_learning_rate
        assert RELATIVE_CPU_COST[name] == recipe.relative_cpu_cost
        # the CPU preset's options: cpu_options where given, else options
        for options in (recipe.options, CPU_MIXER_OPTIONS.get(name, {})):
            assert isinstance(
                build_mixer(name, width, heads, 0, None, **options), mixer_spec(name).layer_class
            )


def test_the_command_lines_offer_the_registry() -> None:
    swap = argparse.ArgumentParser()
    add_swap_arguments(swap)
    (mixer,) = [action for action in swap._actions if action.dest == "mixer"]
    assert tuple(mixer.choices) == MIXER_NAMES
    assert all(f"{spec.name}: {spec.description}" in mixer.help for spec in MIXERS)

    recall_gap = argparse.ArgumentParser()
    add_recall_gap_arguments(recall_gap)
    args = recall_gap.parse_args(["--out", "x", "--mixers", ",".join(MIXER_NAMES)])
    assert tuple(args.mixers) == MIXER_NAMES
    assert all(name in DESCRIPTION for name in MIXER_NAMES)
    with pytest.raises(SystemExit):
        recall_gap.parse_args(["--out", "x", "--mixers", "transformer"])


def test_the_mixer_table_has_one_row_per_entry() -> None:
    lines = mixer_table().splitlines()
    assert lines[0] == "| mixer | what it is | backbones |" and len(lines) == 2 + len(MIXERS)
    for line, spec in zip(lines[2:], MIXERS, strict=True):
        assert line == f"| `{spec.name}` | {spec.description} | Llama, Mamba, Mamba-2 |"


def test_the_readme_mixer_table_is_the_rendered_one() -> None:
    text = README.read_text(encoding="utf-8")
    assert MIXER_TABLE_BEGIN in text, "README.md must hold the mixer table between its markers"
    table = text.split(MIXER_TABLE_BEGIN, 1)[1].split(MIXER_TABLE_END, 1)[0]
    assert table.strip() == mixer_table().strip(), "rerun ttt_mixer.adapters.mixers.registry.mixer_table()"
