"""The registry of mixers: one ``MixerSpec`` per mixer, the only list of them. ``build_mixer``,
``recurrent_state_size``, ``MIXER_NAMES``, ``swap_mixer``'s and the configs' checks, ``swap_mixer``'s
start from attention, the command line's choices and help and the README's mixer table all read it; the recall gap keys its own
per-mixer table (learning rates, options, costs) by these names.

Reading it imports nothing heavy (no torch, transformers or fla): an entry names its layer class and
builder by module path, imported when a mixer is built, so that ``ttt-mixer swap --help`` lists the
mixers in well under a second.

Adding a mixer: its module (a layer on fla's interface with a ``reset_parameters`` that restores what
it initialises itself, see ``ttt_mixer.adapters.mixers``), then one entry in ``MIXERS`` (and its row
in ``ttt_mixer.recall_gap.presets.RECALL_GAP_MIXERS``); tests/adapters/test_mixer_registry.py checks
what every entry must provide.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# builder(hidden_size, num_heads, layer_idx, backbone_config, options) -> the mixer; options are
# checked by the builder or the constructor it calls (unknown: TypeError, bad values: ValueError)
Builder = Callable[[int, int, int, Any, "dict[str, Any]"], "nn.Module"]
# the backbones swap_mixer puts mixers in (ttt_mixer.adapters.configuration's three configs)
BACKBONES = {"llama": "Llama", "mamba": "Mamba", "mamba2": "Mamba-2"}
# how swap_mixer may start a swapped mixer: from its own init, or from the attention it replaces
INITS = ("random", "attention")
# how a mixer starts from the attention it replaces (``MixerSpec.from_attention``, swap_mixer's
# init="attention"): "copy": the attention layer copied as is; "projections": its query, key, value
# and output projections start from the attention's, in the attention's head layout (TTT)
ATTENTION_STARTS = ("copy", "projections")
# the state-size rules (``MixerSpec.state_size``)
CACHED_STATE_SIZE = "ttt_mixer.adapters.mixers.common:cached_state_size"
GROWS_WITH_LENGTH = "ttt_mixer.adapters.mixers.common:grows_with_length"


def resolve(reference: str) -> Any:
    """The object that a ``"module:name"`` reference names, its module imported on first use."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def _no_defaults(hidden_size: int, num_heads: int) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """One mixer: what ``build_mixer`` builds under ``name`` and what the rest of the project reads.
    Code is named by ``"module:name"`` references (``resolve``), imported only when used.

    name: the name users give (``swap_mixer``, configs' ``mixers``, ``--mixer``, ``--mixers``).
    description: one line for the command line's help and the README's table.
    layer: the class ``build`` returns; it keeps fla's layer interface and has its own
        ``reset_parameters`` (its special init, rerun by the backbone's init).
    builder: its builder (``Builder``), which checks its options (unknown: TypeError, bad values:
        ValueError); None: the layer's constructor, called with hidden_size, num_heads, layer_idx,
        ``constructor_defaults(hidden_size, num_heads)`` and the options.
    constructor_defaults: the constructor's arguments where the builder is the constructor.
    state_size: the state-size rule: numbers in one sequence's state (``CACHED_STATE_SIZE``), or
        None where the cache grows with the length (``GROWS_WITH_LENGTH``).
    backbones: the backbones (keys of ``BACKBONES``) it can be built in.
    from_attention: how it starts from the attention it replaces (one of ``ATTENTION_STARTS``), or
        None where it cannot.

    The mixer's own parameter init is its layer's ``reset_parameters``: the backbones' weight init
    reruns it after their own (``MixerPreTrainedMixin._init_weights``), so a mixer starts in a model
    as it starts alone (tests/adapters/test_mixer_init.py).
    """

    name: str
    description: str
    layer: str
    builder: str | None = None
    constructor_defaults: Callable[[int, int], dict[str, Any]] = _no_defaults
    state_size: str = CACHED_STATE_SIZE
    backbones: tuple[str, ...] = tuple(BACKBONES)
    from_attention: str | None = None

    @property
    def layer_class(self) -> type[nn.Module]:
        return resolve(self.layer)

    def build(
        self, hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any, options: dict[str, Any]
    ) -> nn.Module:
        """The mixer, by ``builder`` or the layer's constructor (see the class docstring)."""
        if self.builder is not None:
            return resolve(self.builder)(hidden_size, num_heads, layer_idx, backbone_config, options)
        kwargs = {**self.constructor_defaults(hidden_size, num_heads), **options}
        return self.layer_class(hidden_size=hidden_size, num_heads=num_heads, layer_idx=layer_idx, **kwargs)

    def state_numbers(self, mixer_module: nn.Module) -> int | None:
        """The state-size rule applied to ``mixer_module``, one of this entry's mixers."""
        return resolve(self.state_size)(mixer_module)


# In this order: MIXER_NAMES, the command line's choices and the README's table list them so.
MIXERS: tuple[MixerSpec, ...] = (
    MixerSpec(
        "ttt_linear",
        "TTT-Linear (Sun et al. 2024), a linear model trained on the sequence by a gradient step per mini-batch",
        "ttt_mixer.layers:TTTLinear",
        from_attention="projections",
    ),
    MixerSpec(
        "ttt_mlp",
        "TTT-MLP (Sun et al. 2024), TTT with a two-layer MLP as the inner model",
        "ttt_mixer.layers:TTTMLP",
        from_attention="projections",
    ),
    MixerSpec(
        "attention",
        "softmax attention, transformers' Llama attention with its keys and values in fla's Cache",
        "ttt_mixer.adapters.mixers.attention:CachedAttention",
        "ttt_mixer.adapters.mixers.attention:build_attention",
        state_size=GROWS_WITH_LENGTH,
        from_attention="copy",
    ),
    MixerSpec(
        "based",
        "Based (Arora et al. 2024), fla's Taylor-feature linear attention (feature_dim 16)",
        "ttt_mixer.adapters.mixers.based:BasedMixer",
        constructor_defaults=lambda hidden_size, num_heads: {"feature_dim": 16},
    ),
    MixerSpec(
        "jrt_rnn",
        "JRT-RNN (Arora et al. 2024), prefix linear attention: Based's feature map, an encoder state over the first prefix_length tokens (required option)",
        "ttt_mixer.adapters.mixers.jrt_rnn:JRTRNNMixer",
    ),
    MixerSpec(
        "mamba",
        "Mamba (Gu and Dao 2023), transformers' Mamba mixer with an exact PyTorch selective scan",
        "ttt_mixer.adapters.mixers.mamba:CachedMambaMixer",
        "ttt_mixer.adapters.mixers.mamba:build_mamba",
    ),
    MixerSpec(
        "gla",
        "Gated Linear Attention (Yang et al. 2024), fla's layer with fla's defaults",
        "ttt_mixer.adapters.mixers.gla:GLAMixer",
    ),
    MixerSpec(
        "gated_deltanet",
        "Gated DeltaNet (Yang et al. 2025), fla's layer (head_dim = hidden_size / num_heads)",
        "ttt_mixer.adapters.mixers.gated_deltanet:GatedDeltaNetMixer",
        constructor_defaults=lambda hidden_size, num_heads: {"head_dim": hidden_size // num_heads},
    ),
    MixerSpec(
        "longhorn",
        "Longhorn (Liu et al. 2024), the authors' layer and scan",
        "ttt_mixer.adapters.mixers.longhorn:LonghornMixer",
        "ttt_mixer.adapters.mixers.longhorn:build_longhorn",
    ),
    MixerSpec(
        "mamba2",
        "Mamba-2 (Dao and Gu 2024), transformers' Mamba-2 mixer with a chunked scan that caches exactly",
        "ttt_mixer.adapters.mixers.mamba2:CachedMamba2Mixer",
        "ttt_mixer.adapters.mixers.mamba2:build_mamba2",
    ),
    MixerSpec(
        "titans",
        "Titans (Behrouz et al. 2025), the neural memory as a layer, on the TTT-family op",
        "ttt_mixer.layers:TTTFamilyLayer",
        constructor_defaults=lambda hidden_size, num_heads: {"preset": "titans"},
    ),
    MixerSpec(
        "lact",
        "LaCT (Zhang et al. 2025), large-chunk TTT with SwiGLU fast weights beside sliding-window attention",
        "ttt_mixer.layers:TTTFamilyLayer",
        constructor_defaults=lambda hidden_size, num_heads: {"preset": "lact"},
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
    """The mixer ``name`` (one of MIXER_NAMES) for layer ``layer_idx``, built by its entry
    (``MIXERS``, ``MixerSpec.build``) in ``backbone_config`` (the model's config, or None), ``options`` its constructor
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
    layer_classes = [(spec, spec.layer_class) for spec in MIXERS]
    for cls in type(mixer_module).__mro__:
        for spec, layer_class in layer_classes:
            if layer_class is cls:
                return spec
    classes = sorted({layer_class.__name__ for _, layer_class in layer_classes})
    raise TypeError(
        f"expected one of the registered mixers ({', '.join(classes)}), got {type(mixer_module).__name__}"
    )


def recurrent_state_size(mixer_module: nn.Module) -> int | None:
    """How many numbers one sequence's state holds in this mixer (its entry's ``state_size`` rule:
    recurrent and convolution states together, as the cache stores them), or None for attention,
    whose cache grows with the length."""
    return spec_of(mixer_module).state_numbers(mixer_module)


def attention_start_mixers() -> tuple[str, ...]:
    """The mixers that can start from the attention they replace (``MixerSpec.from_attention``)."""
    return tuple(spec.name for spec in MIXERS if spec.from_attention is not None)


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
