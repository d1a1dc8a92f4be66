"""The registry of mixers: one ``MixerSpec`` per mixer, the only list of them. ``build_mixer``,
``recurrent_state_size``, ``MIXER_NAMES``, ``swap_mixer``'s and the configs' checks, the command
line's choices and help and the README's mixer table all read it; the recall gap keys its own
per-mixer table (learning rates, options, costs) by these names.

Adding a mixer: its module (a layer on fla's interface with a ``reset_parameters`` that restores what
it initialises itself, see ``ttt_mixer.adapters.mixers``), then one entry in ``MIXERS`` (and its row
in ``ttt_mixer.recall_gap.presets.RECALL_GAP_MIXERS``); tests/adapters/test_mixer_registry.py checks
what every entry must provide.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from fla.models.utils import Cache
from torch import nn
from transformers import LlamaConfig, MambaConfig

from ttt_mixer.adapters.mixers.attention import CachedAttention
from ttt_mixer.adapters.mixers.based import BasedMixer
from ttt_mixer.adapters.mixers.common import backbone_layer_count
from ttt_mixer.adapters.mixers.gated_deltanet import GatedDeltaNetMixer
from ttt_mixer.adapters.mixers.gla import GLAMixer
from ttt_mixer.adapters.mixers.jrt_rnn import JRTRNNMixer
from ttt_mixer.adapters.mixers.longhorn import LonghornMixer
from ttt_mixer.adapters.mixers.mamba import CachedMambaMixer
from ttt_mixer.adapters.mixers.mamba2 import CachedMamba2Mixer, build_mamba2
from ttt_mixer.layers import TTTMLP, TTTFamilyLayer, TTTLinear

# builder(hidden_size, num_heads, layer_idx, backbone_config, options) -> the mixer; options are
# checked by the builder or the constructor it calls (unknown: TypeError, bad values: ValueError)
Builder = Callable[[int, int, int, Any, dict[str, Any]], nn.Module]
# the backbones swap_mixer puts mixers in (ttt_mixer.adapters.configuration's three configs)
BACKBONES = {"llama": "Llama", "mamba": "Mamba", "mamba2": "Mamba-2"}


def cached_state_size(mixer_module: nn.Module) -> int:
    """How many numbers one sequence's state holds in ``mixer_module`` (recurrent and convolution
    states together, as fla's Cache stores them): one token run through the mixer on its own device
    and dtype, without gradients, at layer_idx 0 and in eval mode (both restored after)."""
    parameter = next(mixer_module.parameters())
    cache = Cache()
    hidden = torch.zeros(1, 1, mixer_module.hidden_size, device=parameter.device, dtype=parameter.dtype)
    layer_idx = mixer_module.layer_idx
    was_training = mixer_module.training
    try:
        # layer_idx 0 keeps the cache to one entry; a mixer without one gets one for this call
        mixer_module.layer_idx = 0
        mixer_module.eval()
        with torch.no_grad():
            mixer_module(hidden, past_key_values=cache, use_cache=True)
    finally:
        mixer_module.layer_idx = layer_idx
        mixer_module.train(was_training)
    entry = cache[0]

    def count(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel()
        if isinstance(value, (tuple, list)):
            return sum(count(item) for item in value)
        return 0

    return count(entry["recurrent_state"]) + count(entry["conv_state"])


def grows_with_length(mixer_module: nn.Module) -> None:
    """The state-size rule of a mixer whose cache grows with the length (attention's keys and
    values): no fixed size."""
    return None


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """One mixer: what ``build_mixer`` builds under ``name`` and what the rest of the project reads.

    name: the name users give (``swap_mixer``, configs' ``mixers``, ``--mixer``, ``--mixers``).
    description: one line for the command line's help and the README's table.
    layer_class: the class ``build`` returns; it keeps fla's layer interface and has its own
        ``reset_parameters`` (its special init, rerun by the backbone's init).
    build: the builder; it checks its options (unknown: TypeError, bad values: ValueError).
    state_size: the state-size rule: numbers in one sequence's state (``cached_state_size``), or
        None where the cache grows with the length (``grows_with_length``).
    backbones: the backbones (keys of ``BACKBONES``) it can be built in.
    """

    name: str
    description: str
    layer_class: type[nn.Module]
    build: Builder
    state_size: Callable[[nn.Module], int | None] = cached_state_size
    backbones: tuple[str, ...] = tuple(BACKBONES)


def _config_with(
    config_class: type, base: Any, options: dict[str, Any], defaults: dict[str, Any]
) -> LlamaConfig | MambaConfig:
    """A ``config_class`` from the fields of ``base`` (when it is one) or ``defaults``, then
    ``options``; TypeError for an option that is no field of ``config_class`` (transformers would
    store it silently)."""
    fields = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - fields - {"rope_theta"})
    if unknown:
        raise TypeError(f"unknown {config_class.__name__} option(s) {unknown}")
    values = {name: getattr(base, name) for name in fields if hasattr(base, name)} if base is not None else {}
    values = {**defaults, **values, **options}
    if "rope_theta" in options and "rope_parameters" in values:
        # a config's rope_parameters would override a plain rope_theta
        values["rope_parameters"] = {**(values["rope_parameters"] or {}), "rope_theta": options["rope_theta"]}
        values.pop("rope_theta")
    return config_class(**values)


def _attention(
    hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any, options: dict[str, Any]
) -> CachedAttention:
    """``CachedAttention`` on ``backbone_config`` when it is a LlamaConfig, else on a LlamaConfig of
    hidden_size and num_heads; ``options`` are LlamaConfig fields (e.g. rope_theta,
    num_key_value_heads)."""
    if isinstance(backbone_config, LlamaConfig):
        if (backbone_config.hidden_size, backbone_config.num_attention_heads) != (hidden_size, num_heads):
            raise ValueError(
                f"hidden_size {hidden_size} and num_heads {num_heads} differ from the LlamaConfig's "
                f"({backbone_config.hidden_size}, {backbone_config.num_attention_heads})"
            )
        config = _config_with(LlamaConfig, backbone_config, options, {}) if options else backbone_config
    else:
        defaults = {
            "hidden_size": hidden_size,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
        }
        config = _config_with(LlamaConfig, None, options, defaults)
    return CachedAttention(config, layer_idx)


def _mamba(
    hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any, options: dict[str, Any]
) -> CachedMambaMixer:
    """``CachedMambaMixer`` on ``backbone_config`` when it is a MambaConfig, else on a MambaConfig of
    hidden_size (num_heads unused); ``options`` are MambaConfig fields (e.g. state_size, expand,
    conv_kernel) and ``CachedMambaMixer``'s ``A_init`` and ``D_init``."""
    options = dict(options)
    # the mixer's, not MambaConfig fields
    inits = {name: options.pop(name) for name in ("A_init", "D_init") if name in options}
    if isinstance(backbone_config, MambaConfig):
        if backbone_config.hidden_size != hidden_size:
            raise ValueError(
                f"hidden_size {hidden_size} differs from the MambaConfig's {backbone_config.hidden_size}"
            )
        config = _config_with(MambaConfig, backbone_config, options, {}) if options else backbone_config
    else:
        defaults = {
            "hidden_size": hidden_size,
            "num_hidden_layers": backbone_layer_count(backbone_config, layer_idx),
        }
        config = _config_with(MambaConfig, None, options, defaults)
    if not 0 <= layer_idx < config.num_hidden_layers:
        raise ValueError(
            f"layer_idx {layer_idx} is outside the MambaConfig's {config.num_hidden_layers} layers"
        )
    return CachedMambaMixer(config, layer_idx, **inits)


def _constructor(mixer_class: type, defaults: Callable[[int, int], dict[str, Any]]) -> Builder:
    """A builder calling ``mixer_class(hidden_size=, num_heads=, layer_idx=, **defaults, **options)``."""

    def build(
        hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any, options: dict[str, Any]
    ) -> nn.Module:
        kwargs = {**defaults(hidden_size, num_heads), **options}
        return mixer_class(hidden_size=hidden_size, num_heads=num_heads, layer_idx=layer_idx, **kwargs)

    return build


def _no_defaults(hidden_size: int, num_heads: int) -> dict[str, Any]:
    return {}


def _longhorn(
    hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any, options: dict[str, Any]
) -> LonghornMixer:
    """``LonghornMixer`` with the authors' defaults (num_heads unused), ``options`` its arguments."""
    return LonghornMixer(hidden_size=hidden_size, layer_idx=layer_idx, **options)


# In this order: MIXER_NAMES, the command line's choices and the README's table list them so.
MIXERS: tuple[MixerSpec, ...] = (
    MixerSpec(
        "ttt_linear",
        "TTT-Linear (Sun et al. 2024), a linear model trained on the sequence by a gradient step per mini-batch",
        TTTLinear,
        _constructor(TTTLinear, _no_defaults),
    ),
    MixerSpec(
        "ttt_mlp",
        "TTT-MLP (Sun et al. 2024), TTT with a two-layer MLP as the inner model",
        TTTMLP,
        _constructor(TTTMLP, _no_defaults),
    ),
    MixerSpec(
        "attention",
        "softmax attention, transformers' Llama attention with its keys and values in fla's Cache",
        CachedAttention,
        _attention,
        state_size=grows_with_length,
    ),
    MixerSpec(
        "based",
        "Based (Arora et al. 2024), fla's Taylor-feature linear attention (feature_dim 16)",
        BasedMixer,
        _constructor(BasedMixer, lambda hidden_size, num_heads: {"feature_dim": 16}),
    ),
    MixerSpec(
        "jrt_rnn",
        "JRT-RNN (Arora et al. 2024), prefix linear attention: Based's feature map, an encoder state over the first prefix_length tokens (required option)",
        JRTRNNMixer,
        _constructor(JRTRNNMixer, _no_defaults),
    ),
    MixerSpec(
        "mamba",
        "Mamba (Gu and Dao 2023), transformers' Mamba mixer with an exact PyTorch selective scan",
        CachedMambaMixer,
        _mamba,
    ),
    MixerSpec(
        "gla",
        "Gated Linear Attention (Yang et al. 2024), fla's layer with fla's defaults",
        GLAMixer,
        _constructor(GLAMixer, _no_defaults),
    ),
    MixerSpec(
        "gated_deltanet",
        "Gated DeltaNet (Yang et al. 2025), fla's layer (head_dim = hidden_size / num_heads)",
        GatedDeltaNetMixer,
        _constructor(
            GatedDeltaNetMixer, lambda hidden_size, num_heads: {"head_dim": hidden_size // num_heads}
        ),
    ),
    MixerSpec(
        "longhorn",
        "Longhorn (Liu et al. 2024), the authors' layer and scan",
        LonghornMixer,
        _longhorn,
    ),
    MixerSpec(
        "mamba2",
        "Mamba-2 (Dao and Gu 2024), transformers' Mamba-2 mixer with a chunked scan that caches exactly",
        CachedMamba2Mixer,
        build_mamba2,
    ),
    MixerSpec(
        "titans",
        "Titans (Behrouz et al. 2025), the neural memory as a layer, on the TTT-family op",
        TTTFamilyLayer,
        _constructor(TTTFamilyLayer, lambda hidden_size, num_heads: {"preset": "titans"}),
    ),
    MixerSpec(
        "lact",
        "LaCT (Zhang et al. 2025), large-chunk TTT with SwiGLU fast weights beside sliding-window attention",
        TTTFamilyLayer,
        _constructor(TTTFamilyLayer, lambda hidden_size, num_heads: {"preset": "lact"}),
    ),
)
MIXER_SPECS: dict[str, MixerSpec] = {spec.name: spec for spec in MIXERS}
MIXER_NAMES: tuple[str, ...] = tuple(MIXER_SPECS)


def mixer_spec(name: str) -> MixerSpec:
    """The registry's entry for ``name``; ValueError naming the choices for an unknown one."""
    if name not in MIXER_SPECS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {MIXER_NAMES}")
    return MIXER_SPECS[name]


def build_mixer(
    name: str, hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any = None, **options: Any
) -> nn.Module:
    """The mixer ``name`` (one of MIXER_NAMES) for layer ``layer_idx``, built by its entry's builder
    (``MIXERS``) in ``backbone_config`` (the model's config, or None), ``options`` its constructor
    arguments or config fields (each builder's docstring says which). Unknown name or bad values:
    ValueError; unknown options: TypeError naming the mixer.
    """
    spec = mixer_spec(name)
    try:
        return spec.build(hidden_size, num_heads, layer_idx, backbone_config, options)
    except TypeError as error:
        raise TypeError(f"mixer {name!r}: bad options {sorted(options)}: {error}") from error
    except AssertionError as error:  # some constructors check with asserts
        raise ValueError(f"mixer {name!r}: {error}") from error


def spec_of(mixer_module: nn.Module) -> MixerSpec:
    """The first entry whose ``layer_class`` ``mixer_module`` is an instance of, its own class
    before its bases; TypeError for a module that is no registered mixer."""
    for cls in type(mixer_module).__mro__:
        for spec in MIXERS:
            if spec.layer_class is cls:
                return spec
    classes = sorted({spec.layer_class.__name__ for spec in MIXERS})
    raise TypeError(
        f"expected one of the registered mixers ({', '.join(classes)}), got {type(mixer_module).__name__}"
    )


def recurrent_state_size(mixer_module: nn.Module) -> int | None:
    """How many numbers one sequence's state holds in this mixer (its entry's ``state_size`` rule:
    recurrent and convolution states together, as the cache stores them), or None for attention,
    whose cache grows with the length."""
    return spec_of(mixer_module).state_size(mixer_module)


def mixer_help() -> str:
    """Each mixer's name and description, for a command line's help."""
    return "; ".join(f"{spec.name}: {spec.description}" for spec in MIXERS)


# README.md's mixer table lies between these lines (tests/adapters/test_mixer_registry.py compares it)
MIXER_TABLE_BEGIN = "<!-- mixer table: ttt_mixer.adapters.mixers.registry.mixer_table() -->"
MIXER_TABLE_END = "<!-- end of mixer table -->"


def mixer_table() -> str:
    """The README's table of mixers: name, description and backbones, one row per entry."""
    lines = ["| mixer | what it is | backbones |", "| --- | --- | --- |"]
    for spec in MIXERS:
        backbones = ", ".join(BACKBONES[backbone] for backbone in spec.backbones)
        lines.append(f"| `{spec.name}` | {spec.description} | {backbones} |")
    return "\n".join(lines) + "\n"
