"""Pieces shared by the adapter mixers, all plain PyTorch so that every mixer runs on any device:
input checks, reading a layer's fla cache entry, the padding-aware short convolution and fla's
(gated) RMSNorm."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache
from fla.models.utils import Cache
from torch import nn

from ttt_mixer.layers.checks import check_cache_batch, check_hidden_states, padding_mask, resolve_backend
from ttt_mixer.modules.short_conv import causal_depthwise_conv
from ttt_mixer.ops.ttt.checks import check_cu_seqlens

# fla's activations by name (fla.modules.activations.ACT2FN), computed with PyTorch: fla's own are
# Triton kernels, which cannot run on a CPU tensor
TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swish": F.silu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid,
    "relu": F.relu,
    "sqrelu": lambda x: F.relu(x).square(),
    # fla's "gelu" is the tanh approximation
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
}


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in float64 when it is: states accumulate in at least single precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def backbone_layer_count(backbone_config: Any, layer_idx: int) -> int:
    """The layer count of a transformers mixer's own config: the backbone's (its init scales out_proj
    by it under ``rescale_prenorm_residual``), at least layer_idx + 1 (the mixer reads
    ``config.layer_types[layer_idx]``)."""
    return max(layer_idx + 1, getattr(backbone_config, "num_hidden_layers", None) or 0)


def config_with(config_class: type, base: Any, options: dict[str, Any], defaults: dict[str, Any]) -> Any:
    """A ``config_class`` (a transformers config) from the fields of ``base`` (when it is one) or
    ``defaults``, then ``options``; TypeError for an option that is no field of ``config_class``
    (transformers would store it silently)."""
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


def torch_activation(name: str, parameter: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in TORCH_ACTIVATIONS:
        raise ValueError(f"{parameter} must be one of {sorted(TORCH_ACTIVATIONS)}, got {name!r}")
    return TORCH_ACTIVATIONS[name]


def check_inputs(
    module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Checks hidden_states [B, T, hidden_size] and the 0/1 padding mask [B, L >= T]; returns the mask
    of the current tokens (its last T columns) as bool, or None when they are all real tokens."""
    dtype = next(module.parameters()).dtype
    batch_size, q_len = check_hidden_states(type(module).__name__, hidden_states, module.hidden_size, dtype)
    return padding_mask(attention_mask, batch_size, q_len)


def reject_cu_seqlens(module: nn.Module, kwargs: dict[str, Any]) -> None:
    if kwargs.get("cu_seqlens") is not None:
        raise ValueError(
            f"{type(module).__name__}: cu_seqlens (packed sequences) is not supported on this path; "
            "pass a padded batch and a 2-D attention_mask instead"
        )


def cached_states(module: nn.Module, past_key_values: Any, batch_size: int) -> tuple[Any, Any]:
    """(recurrent_state, conv_state) of this layer in the fla cache, each None where absent."""
    entry = get_layer_cache(module, past_key_values)
    if entry is None:
        return None, None
    recurrent_state, conv_state = entry.get("recurrent_state"), entry.get("conv_state")
    if recurrent_state is not None:
        first = recurrent_state[0] if isinstance(recurrent_state, (tuple, list)) else recurrent_state
        check_cache_batch(type(module).__name__, first.shape[0], batch_size)
    return recurrent_state, conv_state


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    window: torch.Tensor | None,
    mask: torch.Tensor | None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A depthwise causal convolution continuing from a window, skipping padding: x [B, T, C],
    weight [C, W], bias [C] or None, window [B, C, W] (fla's layout: the last W inputs before x, the
    oldest first; zeros when None), mask [B, T] bool or None -> (activation(y) [B, T, C], the new
    window [B, C, W]).

    As fla's layers do, the real tokens are unpadded first, so that a real token's window holds the
    previous real tokens and then the old window, never a padding token; padded positions of y are 0.
    """
    batch_size, q_len, _ = x.shape
    packed, indices, cu_seqlens = x, None, None
    if mask is not None:
        packed, indices, cu_seqlens = unpad_hidden_states(x, None, mask.long(), q_len)
    y, window = causal_depthwise_conv(
        packed, weight[:, None], bias, window, weight.shape[-1], True, cu_seqlens
    )
    if activation is not None:
        y = activation(y)
    return repad_hidden_states(y, indices, batch_size, q_len), window


def masked_short_conv(
    conv: nn.Conv1d,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    cache: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ShortConvolution ``conv`` (weights, bias, activation: None, "silu" or "swish") through
    ``causal_conv``: x [B, T, D] -> (y [B, T, D], its cache [B, D, W] or None)."""
    activation = F.silu if getattr(conv, "activation", None) is not None else None
    y, window = causal_conv(x, conv.weight[:, 0], conv.bias, cache, mask, activation)
    return y, window if output_final_state else None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    gate: torch.Tensor | None = None,
    activation: str = "swish",
) -> torch.Tensor:
    """fla's RMSNorm / FusedRMSNormGated over the last dim, in float32 as fla's kernels compute it:
    x / sqrt(mean(x^2) + eps) * weight + bias, then times act(gate) if a gate is given."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    if gate is not None:
        y = y * torch_activation(activation, "gate activation")(gate.float())
    return y.to(x.dtype)


def zero_padding(output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Padded positions -> 0, as fla's layers return them (they re-pad with zeros)."""
    return output if mask is None else torch.where(mask[..., None], output, 0)


def conv_projections(
    module: nn.Module,
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    conv_state: tuple[torch.Tensor, ...] | None,
    use_cache: bool,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, ...]]:
    """((q, k, v), their new conv windows): fla's q/k/v projections, each through its short convolution."""
    windows = conv_state if conv_state is not None else (None, None, None)
    outputs = [
        masked_short_conv(conv, proj(hidden_states), mask, window, use_cache)
        for conv, proj, window in zip(
            (module.q_conv1d, module.k_conv1d, module.v_conv1d),
            (module.q_proj, module.k_proj, module.v_proj),
            windows,
            strict=True,
        )
    ]
    return tuple(out for out, _ in outputs), tuple(window for _, window in outputs)


class TorchPathMixin:
    """``forward`` of a mixer on fla's layer interface (list the mixin first): the input checks, then
    fla's own Triton forward where ``uses_fla_forward`` says so, else the subclass's ``torch_forward``,
    which computes the same in PyTorch."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, Any]:
        """hidden_states [B, T, D] -> (o [B, T, D], None, past_key_values). ``cu_seqlens`` only on the
        Triton path; other keyword arguments (position_ids, cache_position, ...) are ignored."""
        mask = check_inputs(self, hidden_states, attention_mask)
        if self.uses_fla_forward(hidden_states):
            if kwargs.get("cu_seqlens") is not None:
                check_cu_seqlens(kwargs["cu_seqlens"], *hidden_states.shape[:2], "hidden_states")
            return super().forward(
                hidden_states,
                attention_mask=None if mask is None else attention_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                output_attentions=output_attentions,
                **kwargs,
            )
        reject_cu_seqlens(self, kwargs)
        return self.torch_forward(hidden_states, mask, past_key_values, bool(use_cache))

    def uses_fla_forward(self, hidden_states: torch.Tensor) -> bool:
        """Whether fla's layer (its Triton kernels) computes this call: where the backend resolves to
        Triton."""
        return resolve_backend(self.backend, hidden_states.device) == "triton"


class LinearAttentionTorchPath(TorchPathMixin):
    """``torch_forward`` of fla's gated linear-attention layers (GLA, Gated DeltaNet): q, k and v from
    their projections (through their short convolutions where the layer has them), the layer's
    recurrence from the cached state, the state and windows back into the cache, the output stage.

    The subclass defines ``recurrence_inputs(hidden_states, (q, k, v), mask)``, the positional inputs
    of its ``recurrence`` (with the signature of fla's naive recurrent functions: (o, final state)), and
    ``output(o, hidden_states)``, the stage after the recurrence (norm, gate and o_proj)."""

    def torch_forward(
        self, hidden_states: torch.Tensor, mask: torch.Tensor | None, past_key_values: Any, use_cache: bool
    ) -> tuple[torch.Tensor, None, Any]:
        """What fla's forward computes, in PyTorch; ``mask`` [B, T] bool (None: no padding)."""
        batch_size, q_len, _ = hidden_states.shape
        recurrent_state, conv_state = cached_states(self, past_key_values, batch_size)
        if self.use_short_conv:
            qkv, conv_state = conv_projections(self, hidden_states, mask, conv_state, use_cache)
        else:
            projections = (self.q_proj, self.k_proj, self.v_proj)
            qkv = tuple(self.projection_activation(proj(hidden_states)) for proj in projections)
        # fla caches the state as [B, H, V, K] (its state_v_first layout); the recurrences take and
        # give [B, H, K, V]
        o, final_state = self.recurrence(
            *self.recurrence_inputs(hidden_states, qkv, mask),
            initial_state=None if recurrent_state is None else recurrent_state.transpose(-1, -2),
            output_final_state=use_cache,
        )
        update_layer_cache(
            self,
            past_key_values,
            recurrent_state=None if final_state is None else final_state.transpose(-1, -2).contiguous(),
            conv_state=conv_state if self.use_short_conv else None,
            offset=q_len,
        )
        return zero_padding(self.output(o, hidden_states), mask), None, past_key_values

    def projection_activation(self, x: torch.Tensor) -> torch.Tensor:
        """What the layer applies to q, k and v when no short convolution (which has its own) does."""
        return x


class ScanMixerMixin(TorchPathMixin):
    """fla's layer ``forward`` for a mixer computed in PyTorch only (list the mixin first): the input
    checks, the layer's cached states, the cache update and ``out_proj`` written once for Mamba,
    Mamba-2 and Longhorn. The mixer defines ``scan_forward(hidden_states, mask, recurrent_state,
    conv_state, output_final_state) -> (y before out_proj, final recurrent state or None, conv
    window)``. ``cu_seqlens`` is refused; other keyword arguments are ignored."""

    def uses_fla_forward(self, hidden_states: torch.Tensor) -> bool:
        """Never: these mixers have no fla layer underneath."""
        return False

    def torch_forward(
        self, hidden_states: torch.Tensor, mask: torch.Tensor | None, past_key_values: Any, use_cache: bool
    ) -> tuple[torch.Tensor, None, Any]:
        batch_size, q_len, _ = hidden_states.shape
        recurrent_state, conv_state = cached_states(self, past_key_values, batch_size)
        keep = use_cache and past_key_values is not None
        y, recurrent_state, conv_state = self.scan_forward(
            hidden_states, mask, recurrent_state, conv_state, keep
        )
        update_layer_cache(
            self,
            past_key_values,
            recurrent_state=recurrent_state,
            conv_state=conv_state if use_cache else None,
            offset=q_len,
        )
        o = self.out_proj(y.to(hidden_states.dtype))
        return zero_padding(o, mask), None, past_key_values

    def short_conv(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None,
        mask: torch.Tensor | None,
        activation: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's ``conv1d`` through ``causal_conv``: (activation(conv(x)) [B, T, C], its window)."""
        return causal_conv(x, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state, mask, activation)
