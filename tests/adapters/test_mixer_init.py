"""Every mixer starts the same everywhere: each parameter its bare layer initialises specially holds
that start after ``swap_mixer`` into a Llama and a Mamba backbone, inside ``TTTConfig`` models, and
after ``save_pretrained`` / ``from_pretrained(trust_remote_code=True)``.

What "initialised specially" means, and how a start is compared:
  * deterministic starts (constants and structured values: biases, skips D, scales, norms, Mamba's
    S4D A) are found by building the bare layer under two seeds: a parameter equal in both is
    deterministic and must hold the same values in every model (float32 tolerance: the same formula);
  * random starts of their own (Gated DeltaNet's and Mamba's A and dt, the TTT inner weights, the
    projections a mixer sizes itself) are listed in ``RANDOM_STARTS`` with a check of their
    distribution (support, spread or std) that a zeroed start, or one at another scale, fails; every
    random parameter outside a Linear or convolution must be listed there, so that none goes unchecked.
Projections (Linear and convolution weights, Linear biases) that the bare layer leaves at PyTorch's
default are the model's to initialise and are not compared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_MIXER_OPTIONS
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from ttt_mixer import TTTConfig, TTTForCausalLM
from ttt_mixer.adapters import swap_mixer
from ttt_mixer.adapters.mixers import MIXER_NAMES
from ttt_mixer.adapters.mixers.gated_deltanet import GatedDeltaNetMixer
from ttt_mixer.adapters.mixers.longhorn import LonghornMixer
from ttt_mixer.adapters.mixers.mamba import CachedMambaMixer
from ttt_mixer.adapters.mixers.mamba2 import CachedMamba2Mixer
from ttt_mixer.adapters.modeling import layer_mixer
from ttt_mixer.adapters.swap import mixer_path
from ttt_mixer.layers import TTTFamilyLayer, TTTLayer
from ttt_mixer.models.modeling_ttt import mixer_layer
from ttt_mixer.recall_gap.presets import CPU_MIXER_OPTIONS

HIDDEN = 64
NUM_LAYERS = 2
# the swap options: the tests' tiny ones, and the recall gap's CPU preset (whose init options, e.g.
# Mamba's A_init and D_init and Longhorn's dt_bias_init and initializer_range, must reach the model)
OPTION_SETS = {"tiny": TINY_MIXER_OPTIONS, "recall_gap": CPU_MIXER_OPTIONS}


Check = Callable[[torch.Tensor, nn.Module], None]


def within(transform: Callable[[torch.Tensor], torch.Tensor], low: float, high: float) -> Check:
    """transform(values) lies in [low, high] and is not one repeated value (a constant start, e.g.
    zeros, is not a draw from the range)."""

    def check(values: torch.Tensor, module: nn.Module) -> None:
        mapped = transform(values.detach().double())
        assert mapped.min() >= low * (1 - 1e-5) and mapped.max() <= high * (1 + 1e-5), (
            f"values in [{mapped.min():.3g}, {mapped.max():.3g}], expected within [{low}, {high}]"
        )
        if mapped.numel() > 1:
            assert mapped.std() > 0, "a constant start, not a random draw"

    return check


def normal(std: Callable[[torch.Tensor, nn.Module], float]) -> Check:
    """Mean 0 and std ``std(values, module)`` within 25% (at the test's sizes, >= 128 draws, the
    std's own spread is under 7%: 25% is over 3.5 of it; a zeroed start or one at another scale
    such as the backbone's 0.02 instead of 0.1 fails)."""

    def check(values: torch.Tensor, module: nn.Module) -> None:
        values = values.detach().double()
        expected = std(values, module)
        assert values.numel() >= 128, "too few draws for a std check"
        assert abs(values.std().item() - expected) <= 0.25 * expected, (
            f"std {values.std().item():.4g}, expected {expected:.4g}"
        )
        assert abs(values.mean().item()) <= 4 * expected / math.sqrt(values.numel())

    return check


def softplus_dt(min_attr: str, max_attr: str, floor_attr: str | None = None) -> Check:
    """A dt bias: softplus(bias) within the config's [time_step_min, time_step_max] (or its floor)."""

    def check(values: torch.Tensor, module: nn.Module) -> None:
        config = module.config
        low = min(getattr(config, min_attr), getattr(config, floor_attr) if floor_attr else math.inf)
        within(torch.nn.functional.softplus, low, getattr(config, max_attr))(values, module)

    return check


def mamba_dt_weight(values: torch.Tensor, module: nn.Module) -> None:
    """transformers' dt_proj weight: uniform in +-time_step_rank^-1/2 * time_step_scale (std bound/sqrt 3)."""
    bound = module.config.time_step_rank**-0.5 * module.config.time_step_scale
    within(lambda x: x, -bound, bound)(values, module)
    normal(lambda values, module: bound / math.sqrt(3))(values, module)


def longhorn_projection(values: torch.Tensor, module: LonghornMixer) -> None:
    """With ``initializer_range``, Longhorn's in, x and out projections are N(0, initializer_range)."""
    if module.initializer_range is not None:
        normal(lambda values, module: module.initializer_range)(values, module)


# the random starts each mixer class gives itself, by parameter name
RANDOM_STARTS: dict[type, dict[str, Check]] = {
    TTTLayer: {r"w\d+": normal(lambda values, module: 0.02)},
    # inner weights N(0, 1/d_in)
    TTTFamilyLayer: {r"w\w*": normal(lambda values, module: values.shape[-2] ** -0.5)},
    GatedDeltaNetMixer: {
        # fla: A ~ U(0, 16), dt ~ log-uniform in [0.001, 0.1] floored at 1e-4, dt_bias its softplus^-1
        "A_log": within(torch.exp, 0.0, 16.0),
        "dt_bias": within(torch.nn.functional.softplus, 1e-4, 0.1),
    },
    CachedMambaMixer: {
        "dt_proj.bias": softplus_dt("time_step_min", "time_step_max", "time_step_floor"),
        "dt_proj.weight": mamba_dt_weight,
    },
    CachedMamba2Mixer: {"dt_bias": softplus_dt("time_step_min", "time_step_max", "time_step_floor")},
    LonghornMixer: {
        name: longhorn_projection for name in ("in_proj.weight", "x_proj.weight", "out_proj.weight")
    },
}


def random_starts(mixer: nn.Module) -> dict[str, Check]:
    """{parameter name: check} of the mixer's own random starts."""
    patterns = next((checks for cls, checks in RANDOM_STARTS.items() if isinstance(mixer, cls)), {})
    return {
        name: check
        for name, _ in mixer.named_parameters()
        for pattern, check in patterns.items()
        if re.fullmatch(pattern, name)
    }


def projection_parameters(mixer: nn.Module) -> set[str]:
    """Names of the parameters inside Linear and convolution modules (the model initialises those)."""
    return {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in mixer.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d))
        for name, _ in module.named_parameters(recurse=False)
    }


def deterministic_starts(build: Callable[[], nn.Module]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(a bare layer, {name: value} of its parameters that two seeds build the same)."""
    torch.manual_seed(0)
    bare = build()
    torch.manual_seed(1)
    other = dict(build().named_parameters())
    return bare, {
        name: value.detach().clone()
        for name, value in bare.named_parameters()
        if torch.equal(value, other[name])
    }


def assert_same_start(
    context: str, bare: nn.Module, constants: dict[str, torch.Tensor], mixer: nn.Module
) -> None:
    """The mixer in a model holds the bare layer's deterministic starts and draws its random ones as
    the bare layer does (which is checked too)."""
    assert type(mixer) is type(bare), context
    parameters = dict(mixer.named_parameters())
    assert parameters.keys() == dict(bare.named_parameters()).keys(), context
    randoms = random_starts(bare)
    unchecked = set(parameters) - set(constants) - set(randoms) - projection_parameters(bare)
    assert not unchecked, f"{context}: random starts with no check in RANDOM_STARTS: {sorted(unchecked)}"
    for name, value in constants.items():
        # the same formula in float32 (e.g. log(1..N)): equal to rounding
        torch.testing.assert_close(
            parameters[name].detach(), value, msg=lambda m, name=name: f"{context}: {name}: {m}"
        )
    for name, check in randoms.items():
        check(dict(bare.named_parameters())[name], bare)
        try:
            check(parameters[name], mixer)
        except AssertionError as error:
            raise AssertionError(f"{context}: {name}: {error}") from error


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def tiny_mamba() -> MambaForCausalLM:
    config = MambaConfig(
        vocab_size=40, hidden_size=HIDDEN, state_size=8, num_hidden_layers=NUM_LAYERS, pad_token_id=0
    )
    return MambaForCausalLM(config)


def reload(model: nn.Module, folder: Path) -> nn.Module:
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def assert_reloaded_exactly(context: str, saved: nn.Module, reloaded: nn.Module) -> None:
    """Every parameter of the reloaded mixer is the saved one (loading copies, computes nothing)."""
    reloaded_parameters = dict(reloaded.named_parameters())
    for name, value in saved.named_parameters():
        assert torch.equal(reloaded_parameters[name], value), f"{context}: {name} changed on reload"


@pytest.mark.compat
@pytest.mark.parametrize("option_set", OPTION_SETS)
@pytest.mark.parametrize("backbone", ["llama", "mamba"])
@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_swapped_mixer_starts_as_its_bare_layer(
    mixer: str, backbone: str, option_set: str, tmp_path: Path
) -> None:
    """(a) the bare layer, (b) after swap_mixer into a tiny Llama / Mamba, (d) after save and reload."""
    torch.manual_seed(0)
    base = tiny_llama() if backbone == "llama" else tiny_mamba()
    torch.manual_seed(1)
    model = swap_mixer(base, mixer, "all", **OPTION_SETS[option_set].get(mixer, {}))
    reloaded = reload(model, tmp_path)
    path = mixer_path(model)
    num_heads = model.config.num_attention_heads if backbone == "llama" else model.config.num_heads
    for i in range(NUM_LAYERS):
        bare, constants = deterministic_starts(lambda i=i: layer_mixer(model.config, i, num_heads))
        in_model = model.get_submodule(path.format(i))
        assert_same_start(f"{mixer} in {backbone} layer {i}", bare, constants, in_model)
        in_reloaded = reloaded.get_submodule(path.format(i))
        assert_reloaded_exactly(f"{mixer} in reloaded {backbone} layer {i}", in_model, in_reloaded)
        assert_same_start(f"{mixer} in reloaded {backbone} layer {i}", bare, constants, in_reloaded)


# case id (the mixer's name, then a variant after "-") -> TTTConfig fields
TTT_MODEL_CASES = {
    "ttt_linear": {"ttt_layer_type": "linear"},
    "ttt_mlp": {"ttt_layer_type": "mlp"},
    "titans": {"ttt_preset": "titans"},
    "titans-residual-norm": {"ttt_preset": "titans", "memory_residual_norm": True},
    "lact": {"ttt_preset": "lact", "window_size": 3},
    "lact-short-conv": {"ttt_preset": "lact", "window_size": 3, "use_short_conv": True},
}


@pytest.mark.compat
@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("case", TTT_MODEL_CASES)
def test_ttt_model_mixer_starts_as_its_bare_layer(case: str, backbone: str, tmp_path: Path) -> None:
    """(c) inside TTTConfig models, and (d) after their save and reload."""
    config = TTTConfig(
        vocab_size=40,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        mini_batch_size=4,
        backbone=backbone,
        pad_token_id=0,
        **TTT_MODEL_CASES[case],
    )
    torch.manual_seed(0)
    model = TTTForCausalLM(config)
    reloaded = reload(model, tmp_path)
    for i in range(NUM_LAYERS):
        bare, constants = deterministic_starts(lambda i=i: mixer_layer(config, i))
        in_model = model.model.layers[i].attn
        assert_same_start(f"{case} in a {backbone} TTT model, layer {i}", bare, constants, in_model)
        in_reloaded = reloaded.model.layers[i].attn
        assert_reloaded_exactly(f"{case} in a reloaded TTT model, layer {i}", in_model, in_reloaded)
        assert_same_start(f"{case} in a reloaded TTT model, layer {i}", bare, constants, in_reloaded)


def test_every_mixer_is_covered() -> None:
    """The swap test runs every mixer name, the TTT family's presets among them."""
    assert {"titans", "lact"} <= set(MIXER_NAMES)
    assert {case.split("-")[0] for case in TTT_MODEL_CASES} <= set(MIXER_NAMES)
