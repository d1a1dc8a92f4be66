"""Configs of backbones whose layers may each hold a different sequence mixer.

``mixers[i]`` names layer i's mixer; ``mixer_options[name]`` holds the constructor options shared by
every layer with that mixer. Everything else is the backbone's own config (Llama or Mamba), so a
model swapped from a checkpoint keeps its fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any

from transformers import LlamaConfig, MambaConfig

from ttt_mixer.adapters.mixers import MIXER_NAMES
from ttt_mixer.models.configuration_ttt import reject_unknown_fields


def known_fields(config: Any) -> set[str]:
    """The fields of a dataclass-style transformers config, what its backbone's config (the last of
    its bases) writes into ``to_dict`` beside them (Mamba's intermediate_size) and the model_type that
    loading passes."""
    return (
        {field.name for field in dataclasses.fields(config)}
        | backbone_keys(type(config).__bases__[-1])
        | {"model_type"}
    )


@functools.cache
def backbone_keys(backbone_config: type) -> frozenset[str]:
    return frozenset(backbone_config().to_dict())


def own_fields(config: Any) -> set[str]:
    """The fields a mixer config adds to its backbone's (``mixers``, ``mixer_options``, ...)."""
    return {field.name for field in dataclasses.fields(config)} - backbone_keys(type(config).__bases__[-1])


# how close (difflib's ratio) an unknown field must be to one of our own fields to be taken for a
# misspelling of it: "mixer" (0.91), "num_head" (0.94) and "mixer_opts" (0.87) are; published fields
# are not ("kv_heads" 0.71, "use_bias" 0.62, "num_key_value_heads" 0.64 to "num_heads")
OWN_FIELD_CUTOFF = 0.8


def reject_misspelt_own_fields(config: Any, kwargs: dict[str, Any]) -> None:
    """TypeError for an unknown field that is a near-miss of one of the config's own fields: the
    backbone's config would keep it silently and the field meant would be ignored. Other unknown
    fields are kept, as transformers keeps them: a checkpoint's config carries fields of its own."""
    own = own_fields(config)
    unknown = set(kwargs) - known_fields(config)
    misspelt = {name for name in unknown if difflib.get_close_matches(name, own, 1, OWN_FIELD_CUTOFF)}
    reject_unknown_fields(type(config).__name__, dict.fromkeys(misspelt), own)


def check_mixer_fields(mixers: list[str], mixer_options: dict[str, dict[str, Any]], num_layers: int) -> None:
    """ValueError unless ``mixers`` names a known mixer for each of ``num_layers`` layers and
    ``mixer_options`` maps known mixer names to dicts."""
    if not isinstance(mixers, (list, tuple)) or len(mixers) != num_layers:
        raise ValueError(f"mixers must be a list of {num_layers} mixer names (one per layer), got {mixers!r}")
    unknown = sorted({m for m in mixers if m not in MIXER_NAMES})
    if unknown:
        raise ValueError(f"mixers: unknown mixer(s) {unknown}; known: {list(MIXER_NAMES)}")
    if not isinstance(mixer_options, dict) or not all(
        name in MIXER_NAMES and isinstance(options, dict) for name, options in mixer_options.items()
    ):
        raise ValueError(
            f"mixer_options must map mixer names ({list(MIXER_NAMES)}) to dicts of options, got {mixer_options!r}"
        )


class MixerFieldsMixin:
    """``__post_init__`` of a backbone's config with a mixer in each layer (list it before the
    backbone's config): unknown fields kept unless they misspell one of our own fields, ``mixers`` a list (``default_mixer`` in every layer
    when None), ``mixer_options`` a dict, the fields the config adds to its backbone's filled in or
    checked (its ``check_backbone_fields()``), then the mixers checked. Each config declares the
    fields itself: transformers makes a config class a dataclass of its own annotations and those of
    its config bases, not of a mixin's."""

    default_mixer: str

    def __post_init__(self, **kwargs: Any) -> None:
        reject_misspelt_own_fields(self, kwargs)
        super().__post_init__(**kwargs)
        if self.mixers is None:
            self.mixers = [self.default_mixer] * self.num_hidden_layers
        self.mixers = list(self.mixers)
        self.mixer_options = dict(self.mixer_options or {})
        self.check_backbone_fields()
        check_mixer_fields(self.mixers, self.mixer_options, self.num_hidden_layers)


class MixerLlamaConfig(MixerFieldsMixin, LlamaConfig):
    """A Llama backbone (embeddings, RMSNorm, SwiGLU MLP) with a chosen mixer in each layer.

    ``num_attention_heads`` also sets the heads of the other mixers unless their options say otherwise.
    ``qkv_bias``: biases on the attention's q/k/v projections only, as Qwen2 has them (None: follow
    ``attention_bias``, which sets all four).
    """

    model_type = "ttt_mixer_llama"
    default_mixer = "attention"
    # Llama's tensor- and pipeline-parallel plans name attention's projections and Llama's layer
    # outputs; other mixers have other projections and the layers return (hidden, attentions)
    base_model_tp_plan = None
    base_model_pp_plan = None
    mixers: list[str] | None = None
    mixer_options: dict[str, dict[str, Any]] | None = None
    qkv_bias: bool | None = None

    def check_backbone_fields(self) -> None:
        """qkv_bias follows attention_bias unless given."""
        if self.qkv_bias is None:
            self.qkv_bias = bool(self.attention_bias)


class MixerMambaConfig(MixerFieldsMixin, MambaConfig):
    """A Mamba backbone (embeddings, RMSNorm, residual mixer blocks) with a chosen mixer in each layer.

    Mamba has no heads; ``num_heads`` sets the heads of the other mixers (default: hidden_size / 64).
    """

    model_type = "ttt_mixer_mamba"
    default_mixer = "mamba"
    mixers: list[str] | None = None
    mixer_options: dict[str, dict[str, Any]] | None = None
    num_heads: int | None = None

    def check_backbone_fields(self) -> None:
        """num_heads defaults to hidden_size / 64 and must divide hidden_size."""
        if self.num_heads is None:
            self.num_heads = max(1, self.hidden_size // 64)
        if not isinstance(self.num_heads, int) or self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads must be a positive divisor of hidden_size ({self.hidden_size}), got {self.num_heads!r}"
            )
