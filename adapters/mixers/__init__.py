"""The sequence mixers a backbone layer can hold, all on fla's layer interface:

    mixer(hidden_states [B, T, D], attention_mask=None, past_key_values=None, use_cache=False, **kwargs)
        -> (o [B, T, D], None, past_key_values)

with their state in fla's ``Cache`` at ``mixer.layer_idx`` and a 2-D padding mask whose last T
columns cover the new tokens. Every mixer runs on CPU in plain PyTorch; on CUDA the fla mixers run
fla's Triton kernels.
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
from ttt_mixer.adapters.mixers.longhorn import LonghornMixer
from ttt_mixer.adapters.mixers.mamba import CachedMambaMixer, MambaLayerState
from ttt_mixer.adapters.mixers.mamba2 import build_mamba2
from ttt_mixer.layers import TTTMLP, TTTFamilyLayer, TTTLinear

MIXER_NAMES = (
    "ttt_linear",
    "ttt_mlp",
    "attention",
    "based",
    "mamba",
    "gla",
    "gated_deltanet",
    "longhorn",
    "mamba2",
    "titans",
    "lact",
)


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


Builder = Callable[[int, int, int, Any, dict[str, Any]], nn.Module]


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


_BUILDERS: dict[str, Builder] = {
    "ttt_linear": _constructor(TTTLinear, _no_defaults),
    "ttt_mlp": _constructor(TTTMLP, _no_defaults),
    "attention": _attention,
    "based": _constructor(BasedMixer, lambda hidden_size, num_heads: {"feature_dim": 16}),
    "mamba": _mamba,
    "gla": _constructor(GLAMixer, _no_defaults),
    "gated_deltanet": _constructor(
        GatedDeltaNetMixer, lambda hidden_size, num_heads: {"head_dim": hidden_size // num_heads}
    ),
    "longhorn": lambda hidden_size, num_heads, layer_idx, backbone_config, options: LonghornMixer(
        hidden_size=hidden_size, layer_idx=layer_idx, **options
    ),
    "mamba2": build_mamba2,
    "titans": _constructor(TTTFamilyLayer, lambda hidden_size, num_heads: {"preset": "titans"}),
    "lact": _constructor(TTTFamilyLayer, lambda hidden_size, num_heads: {"preset": "lact"}),
}


def build_mixer(
    name: str, hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any = None, **options: Any
) -> nn.Module:
    """The mixer ``name`` (one of MIXER_NAMES) for layer ``layer_idx``.

    ttt_linear / ttt_mlp: ``TTTLinear`` / ``TTTMLP``; based / gla / gated_deltanet: ``BasedMixer``
    (feature_dim 16), ``GLAMixer`` (fla's defaults), ``GatedDeltaNetMixer`` (head_dim = hidden_size //
    num_heads), each with ``options`` as constructor arguments. attention: ``CachedAttention`` on
    ``backbone_config`` when it is a LlamaConfig, else on a LlamaConfig of hidden_size and num_heads;
    mamba: ``CachedMambaMixer`` on ``backbone_config`` when it is a MambaConfig, else on a MambaConfig
    of hidden_size (num_heads unused); for these two ``options`` are config fields (e.g. rope_theta,
    num_key_value_heads; state_size, expand, conv_kernel), and for mamba also ``A_init`` and
    ``D_init`` (``CachedMambaMixer``'s). longhorn: ``LonghornMixer`` (the authors'
    defaults; num_heads unused) with ``options`` as constructor arguments; mamba2: ``CachedMamba2Mixer``
    on a Mamba2Config of hidden_size, num_heads heads and 1 group (in a Mamba-2 backbone: on its
    config's fields), ``options`` its fields (e.g. state_size, expand, head_dim); titans / lact: ``TTTFamilyLayer`` with that preset, ``options`` its
    constructor arguments (e.g. mini_batch_size, window_size, use_muon). Unknown name or bad values: ValueError; unknown options: TypeError
    naming the mixer.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {MIXER_NAMES}")
    try:
        return _BUILDERS[name](hidden_size, num_heads, layer_idx, backbone_config, options)
    except TypeError as error:
        raise TypeError(f"mixer {name!r}: bad options {sorted(options)}: {error}") from error
    except AssertionError as error:  # some constructors check with asserts
        raise ValueError(f"mixer {name!r}: {error}") from error


def recurrent_state_size(mixer_module: nn.Module) -> int | None:
    """How many numbers one sequence's state holds in this mixer (recurrent and convolution states
    together, as the cache stores them), or None for attention, whose cache grows with the length.
    Found by running one token through the mixer on its own device and dtype, without gradients."""
    if isinstance(mixer_module, CachedAttention):
        return None
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


__all__ = [
    "MIXER_NAMES",
    "BasedMixer",
    "CachedAttention",
    "CachedMambaMixer",
    "GLAMixer",
    "GatedDeltaNetMixer",
    "MambaLayerState",
    "build_mixer",
    "recurrent_state_size",
]
