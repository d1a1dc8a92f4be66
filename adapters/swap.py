"""``swap_mixer``: put a chosen sequence mixer into some or all layers of a Llama, Mamba or Mamba-2
model."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import (
    LlamaForCausalLM,
    Mamba2ForCausalLM,
    MambaForCausalLM,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
)

from ttt_mixer.adapters.configuration import MixerLlamaConfig, MixerMamba2Config, MixerMambaConfig
from ttt_mixer.adapters.mixers.registry import INITS, MIXER_NAMES, attention_start_mixers, mixer_spec
from ttt_mixer.adapters.modeling import MixerLlamaForCausalLM, MixerMamba2ForCausalLM, MixerMambaForCausalLM
from ttt_mixer.layers import TTTLayer

# config keys that do not carry over: those that name a class or a file rather than describe the
# network, Mistral's and Qwen2's attention windows, checked not to bind (``_check_full_attention``),
# and how the source's weights were stored: a GGUF load leaves {"quant_method": "gguf", "gguf_file":
# ...} although its weights are dequantised, and the swapped model holds plain tensors; carried over,
# reloading the swapped model would attach transformers' GGUF quantizer, and the reloaded model would
# then refuse save_pretrained ("not serializable") and Trainer ("purely quantized models"). Every
# other field a checkpoint carries (SmolLM2's is_llama_config, a GGUF load's unk_token_id, ...) is kept.
_NOT_CARRIED_KEYS = (
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "quantization_config",
    "mixers",
    "mixer_options",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
)


def _family(model: nn.Module) -> tuple[type, type, str]:
    """(config class, model class, module path of layer i's mixer) of a supported model; the config
    class's ``default_mixer`` is the backbone's own mixer."""
    if isinstance(model, (MistralForCausalLM, Qwen2ForCausalLM)):
        _check_full_attention(model)
    if isinstance(model, (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixerLlamaForCausalLM)):
        return MixerLlamaConfig, MixerLlamaForCausalLM, "model.layers.{}.self_attn"
    # (a MixerMamba2ForCausalLM is a MixerMambaForCausalLM: tested first)
    if isinstance(model, (Mamba2ForCausalLM, MixerMamba2ForCausalLM)):
        return MixerMamba2Config, MixerMamba2ForCausalLM, "backbone.layers.{}.mixer"
    if isinstance(model, (MambaForCausalLM, MixerMambaForCausalLM)):
        return MixerMambaConfig, MixerMambaForCausalLM, "backbone.layers.{}.mixer"
    raise TypeError(
        "swap_mixer takes a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MambaForCausalLM, "
        "Mamba2ForCausalLM or a model swap_mixer returned (MixerLlamaForCausalLM, MixerMambaForCausalLM, "
        f"MixerMamba2ForCausalLM), got {type(model).__module__}.{type(model).__qualname__}"
    )


def _check_full_attention(model: MistralForCausalLM | Qwen2ForCausalLM) -> None:
    """Mistral and Qwen2 models are Llama models (same modules and weight names; Qwen2 with q/k/v
    biases) when their attention window never binds; a binding sliding window is refused rather
    than widened to full attention."""
    config = model.config
    window = config.sliding_window
    if isinstance(model, Qwen2ForCausalLM):
        window = window if config.use_sliding_window else None
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(
            f"swap_mixer takes {type(model).__name__} with full attention only: its sliding window of "
            f"{window} tokens is below max_position_embeddings={config.max_position_embeddings} (Mistral: "
            "sliding_window=None, as from Mistral-7B-v0.2 on; Qwen2: use_sliding_window=False, its default)"
        )


def mixer_path(model: nn.Module) -> str:
    """Module path of layer i's mixer, to ``.format(i)``."""
    return _family(model)[2]


def mixer_names(model: nn.Module) -> list[str]:
    """The mixer of each layer: the config's list, or the plain backbone's own mixer everywhere."""
    default_mixer = _family(model)[0].default_mixer
    return list(getattr(model.config, "mixers", [default_mixer] * model.config.num_hidden_layers))


def parse_layers(layers: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    """``"all"``, ``"every:k"`` (layers k-1, 2k-1, ...: every k-th layer) or a list of layer indices."""
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str) and layers.startswith("every:"):
        step = layers[len("every:") :]
        if not step.isdigit() or int(step) < 1:
            raise ValueError(f"layers: 'every:k' needs an integer k >= 1, got {layers!r}")
        if int(step) > num_layers:
            raise ValueError(
                f"layers {layers!r} selects no layer of a model with {num_layers} layers: k must be <= {num_layers}"
            )
        return list(range(int(step) - 1, num_layers, int(step)))
    if isinstance(layers, str):
        raise ValueError(f"layers must be 'all', 'every:k' or a list of layer indices, got {layers!r}")
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        raise TypeError(f"layers must be 'all', 'every:k' or a list of layer indices, got {layers!r}")
    indices = list(layers)
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers: indices {bad} out of range for a model with {num_layers} layers")
    if len(set(indices)) != len(indices) or not indices:
        raise ValueError(f"layers must be a non-empty list of distinct indices, got {indices}")
    return sorted(indices)


def _mixer_config(model: PreTrainedModel, config_class: type) -> Any:
    fields = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_CARRIED_KEYS}
    if isinstance(model, Qwen2ForCausalLM):
        fields["qkv_bias"] = True
    return config_class(
        **fields, mixers=mixer_names(model), mixer_options=getattr(model.config, "mixer_options", {})
    )


def rope_half_to_interleaved(head_dim: int) -> torch.Tensor:
    """Row order that turns transformers' half-split RoPE pairs (i, i + d/2) into the interleaved pairs
    (2i, 2i + 1) that TTT rotates, so each query/key pair keeps its frequency."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=1).flatten()


def _attention_layout(attention: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of a transformers attention layer (Llama's, Mistral's,
    Qwen2's, or ``CachedAttention`` in a swapped model), from its projections: a Mamba backbone's
    config names no attention heads."""
    head_dim = attention.head_dim
    return attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim, head_dim


def _attention_head_options(mixer: str, attention: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for a mixer that ``init="attention"`` starts from ``attention``'s projections (every
    attention layer of a model has one layout): its head_dim added when it is not hidden_size /
    num_heads (Mistral-Nemo's 128 with 5120 / 32), a conflicting head_dim refused."""
    if mixer_spec(mixer).from_attention != "projections":
        return options
    heads, _, head_dim = _attention_layout(attention)
    if "head_dim" in options and options["head_dim"] != head_dim:
        raise ValueError(
            f"init='attention': head_dim={options['head_dim']!r} differs from the attention's head_dim "
            f"{head_dim}; leave head_dim out to take the attention's"
        )
    if head_dim == attention.q_proj.in_features // heads:
        return options
    return options | {"head_dim": head_dim}


def _init_ttt_from_attention(ttt: TTTLayer, attention: nn.Module) -> None:
    """theta_Q/K/V/O from the q/k/v/o projections of ``attention``, in its own head layout."""
    heads, kv_heads, head_dim = _attention_layout(attention)
    if (ttt.num_heads, ttt.head_dim) != (heads, head_dim):
        raise ValueError(
            f"init='attention': the TTT layer has {ttt.num_heads} heads of size {ttt.head_dim} but the "
            f"attention has {heads} heads of size {head_dim}; give num_heads={heads} (or leave it out)"
        )
    if not hasattr(ttt, "k_proj"):
        raise ValueError("init='attention' needs separate key projections: share_qk must be False")
    projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
    if any(projection.bias is not None for projection in projections):
        raise ValueError("init='attention' cannot map biased q/k/v projections: TTT projections have no bias")
    order = rope_half_to_interleaved(head_dim)

    def heads_view(weight: torch.Tensor, count: int, rope: bool) -> torch.Tensor:
        weight = weight.view(count, head_dim, -1)
        weight = weight[:, order] if rope else weight
        # grouped-query attention: query head h reads key/value head h // (heads / kv_heads)
        return weight.repeat_interleave(heads // count, dim=0).reshape(heads * head_dim, -1)

    with torch.no_grad():
        ttt.q_proj.weight.copy_(heads_view(attention.q_proj.weight, heads, rope=True))
        ttt.k_proj.weight.copy_(heads_view(attention.k_proj.weight, kv_heads, rope=True))
        ttt.v_proj.weight.copy_(heads_view(attention.v_proj.weight, kv_heads, rope=False))
        ttt.o_proj.weight.copy_(attention.o_proj.weight)


def swap_mixer(
    model: PreTrainedModel,
    mixer: str,
    layers: str | list[int] = "all",
    init: str = "random",
    **mixer_options: Any,
) -> MixerLlamaForCausalLM | MixerMambaForCausalLM | MixerMamba2ForCausalLM:
    """A copy of ``model`` with ``mixer`` in the named layers; every other weight is kept.

    model: ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` with full attention
        (no sliding window below ``max_position_embeddings``), ``MambaForCausalLM``,
        ``Mamba2ForCausalLM`` or a model this function returned.
    mixer: one of ``MIXER_NAMES``; ``mixer_options`` go to its constructor (e.g. ``mini_batch_size``).
    layers: ``"all"``, ``"every:k"`` (every k-th layer: k-1, 2k-1, ...) or a list of indices.
    init: ``"random"`` (the mixer's own initialisation) or ``"attention"``: start from the attention
        layer it replaces, as the mixer's registry entry says (``MixerSpec.from_attention``; the
        mixers that can: ``attention_start_mixers()``). "projections" (TTT): theta_Q/K/V/O are the
        attention's q/k/v/o projections, key and value heads repeated for grouped-query attention,
        and query/key rows reordered from transformers' half-split RoPE pairs to TTT's interleaved
        ones; the TTT layer takes the attention's head_dim (set in its options when it is not
        hidden_size / num_attention_heads). "copy" (attention): the layer is copied as is.
    """
    config_class, model_class, path = _family(model)
    if mixer not in MIXER_NAMES:
        raise ValueError(f"mixer must be one of {list(MIXER_NAMES)}, got {mixer!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
    config = _mixer_config(model, config_class)
    indices = parse_layers(layers, config.num_hidden_layers)
    if init == "attention":
        if mixer_spec(mixer).from_attention is None:
            raise ValueError(
                f"init='attention' supports mixers {list(attention_start_mixers())}, not {mixer!r}"
            )
        not_attention = [i for i in indices if config.mixers[i] != "attention"]
        if not_attention:
            raise ValueError(f"init='attention': layers {not_attention} hold no attention to start from")
        attention = model.get_submodule(path.format(indices[0]))
        mixer_options = _attention_head_options(mixer, attention, mixer_options)
    kept = [config.mixers[i] for i in range(config.num_hidden_layers) if i not in indices]
    if mixer_options and mixer in kept and config.mixer_options.get(mixer, {}) != mixer_options:
        raise ValueError(
            f"mixer_options: layers not swapped already hold {mixer!r} with options "
            f"{config.mixer_options.get(mixer, {})}; one mixer kind has one set of options per model"
        )

    new_config = copy.deepcopy(config)
    for i in indices:
        new_config.mixers[i] = mixer
    if mixer_options:
        new_config.mixer_options[mixer] = dict(mixer_options)
    parameter = next(model.parameters())
    swapped = model_class(new_config).to(device=parameter.device, dtype=parameter.dtype)

    prefixes = tuple(f"{path.format(i)}." for i in indices)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    missing, unexpected = swapped.load_state_dict(state, strict=False)
    stray = [k for k in missing if not k.startswith(prefixes)] + list(unexpected)
    if stray:
        raise ValueError(f"cannot carry {type(model).__name__}'s weights over; unmatched keys: {stray[:8]}")
    if init == "attention":
        for i in indices:
            old, new = model.get_submodule(path.format(i)), swapped.get_submodule(path.format(i))
            if mixer_spec(mixer).from_attention == "projections":
                _init_ttt_from_attention(new, old)
            else:  # "copy"
                new.load_state_dict(old.state_dict())
    swapped.generation_config = copy.deepcopy(model.generation_config)
    swapped.train(model.training)
    return swapped
