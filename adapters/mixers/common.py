"""Pieces shared by the adapter mixers, all plain PyTorch so that every mixer runs on any device:
input checks, reading a layer's fla cache entry, the padding-aware short convolution and fla's
(gated) RMSNorm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from fla.layers.utils import get_layer_cache
from torch import nn

from ttt_mixer.layers.checks import check_cache_batch, check_hidden_states, padding_mask, resolve_backend

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


def masked_short_conv(
    conv: nn.Conv1d,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    cache: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ShortConvolution ``conv`` (weights, bias, activation) in PyTorch, padding-aware:
    x [B, T, D] -> (y [B, T, D], cache or None).

    The cache has fla's layout [B, D, W] (W the kernel size): the last W inputs of the sequence, the
    oldest first. fla's layers unpad before convolving, so a real token's window holds the previous
    real tokens and then the cache, never a padding token; here the same windows come from moving, in
    every row, the padding to the front (a stable sort on the mask) with the cache right before the
    first real token. Padded positions of y are 0.
    """
    batch_size, _, dim = x.shape
    width = conv.kernel_size[0]
    if cache is None:
        cache = x.new_zeros(batch_size, dim, width)
    elif tuple(cache.shape) != (batch_size, dim, width):
        raise ValueError(f"conv_state must have shape [batch_size, D, W] = {[batch_size, dim, width]}")
    sequence = torch.cat([cache.to(x.dtype).transpose(1, 2), x], dim=1)  # [B, W + T, D]
    if mask is not None:
        valid = torch.cat([mask.new_ones(batch_size, width), mask], dim=1)
        order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)
        sequence = torch.where(valid[..., None], sequence, 0).gather(1, order[..., None].expand(-1, -1, dim))
    # y_t = sum_i w_i x_{t - W + 1 + i}, over the W-wide windows that end at each position
    if mask is None:
        windows = sequence[:, 1:].unfold(1, width, 1)  # [B, T, D, W]: the T current positions
    else:
        windows = F.pad(sequence, (0, 0, width - 1, 0)).unfold(1, width, 1)  # [B, W + T, D, W]
    y = (windows.float() * conv.weight[:, 0].float()).sum(-1)
    if mask is not None:
        # back to the original order, at the T current positions
        inverse = torch.argsort(order, dim=1)[:, width:]
        y = y.gather(1, inverse[..., None].expand(-1, -1, dim))
    if conv.bias is not None:
        y = y + conv.bias.float()
    # ShortConvolution's activation: None, "silu" or "swish"
    if getattr(conv, "activation", None) is not None:
        y = F.silu(y)
    y = y.to(x.dtype)
    if mask is not None:
        y = torch.where(mask[..., None], y, 0)
    final = sequence[:, -width:].transpose(1, 2).contiguous() if output_final_state else None
    return y, final


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
    """``forward`` of an fla layer subclass (list the mixin first): fla's own Triton forward where the
    backend is Triton, else the subclass's ``torch_forward``, which computes the same in PyTorch."""

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
        if resolve_backend(self.backend, hidden_states.device) == "triton":
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
