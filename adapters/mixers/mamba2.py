"""Mamba-2 (Dao and Gu 2024) on the fla layer interface: transformers' ``Mamba2Mixer`` (parameters,
initialisation and state layout) computed in PyTorch with ``ssd_scan``, its states in fla's Cache.

transformers' own PyTorch path casts the scan to float32, decodes one token at a time through a
second formula, and zeroes padded inputs (exact for left padding only); fla 0.6's ``Mamba2`` torch
path refuses continuations of more than one token. Both keep the same recurrence, which this module
computes once, in the input's precision (at least float32), from any cached state.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from ttt_mixer.adapters.mixers.common import ScanMixerMixin, backbone_layer_count
from ttt_mixer.adapters.mixers.mamba import init_as_transformers
from ttt_mixer.adapters.mixers.selective_scan import ssd_scan

# transformers 5.2x renamed Mamba2Mixer.forward's ``cache_params`` to ``cache``
MAMBA2_CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(Mamba2Mixer.forward).parameters else "cache_params"
)
# tokens per chunk of the scan on CPU (at most the config's chunk_size): the chunk's quadratic part
# costs chunk_size per token, the loop across chunks one step per chunk
CPU_CHUNK_SIZE = 64


class CachedMamba2Mixer(ScanMixerMixin, Mamba2Mixer):
    """transformers' ``Mamba2Mixer`` (same parameters) with fla's forward signature.

    Per head h (head_dim P, state N, B and C shared by the heads of a group):
    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t + D x_t, then the gated RMSNorm
    (y * silu(z), normalised per group) and out_proj; dt = softplus(in_proj's dt + dt_bias), clamped
    to ``time_step_limit``. Cache entry: ``conv_state`` [B, conv_dim, conv_kernel] (the last
    conv_kernel inputs of the convolution over x, B and C) and ``recurrent_state``
    [B, num_heads, head_dim, state_size], in at least float32. Exact for any prefill/continuation
    split; padded tokens change no state (dt 0) and no convolution window, and output 0. Keyword
    arguments other than ``cu_seqlens`` (refused) are ignored.
    """

    def __init__(self, config: Mamba2Config, layer_idx: int = 0) -> None:
        if config.num_heads % config.n_groups:
            raise ValueError(
                f"num_heads ({config.num_heads}) must be a multiple of n_groups ({config.n_groups})"
            )
        super().__init__(config, layer_idx)
        self.config = config  # as MambaMixer keeps its own: the backbone initialises from it
        # as mamba_ssm and fla: no weight decay on A_log, D and dt_bias (recall_gap's trainer honours it)
        for parameter in (self.A_log, self.D, self.dt_bias):
            parameter._no_weight_decay = True

    def reset_parameters(self) -> None:
        """The start transformers' Mamba-2 model gives its mixers (``init_as_transformers``): what a
        backbone's init calls after its own, so that the mixer starts alike in any backbone."""
        init_as_transformers(self)

    def scan_forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        recurrent_state: torch.Tensor | None,
        conv_state: torch.Tensor | None,
        output_final_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """in_proj -> (gate, xBC, dt), xBC through the conv and activation, the SSD scan, the D skip
        and the gated RMSNorm: what ScanMixerMixin feeds to out_proj."""
        batch_size, q_len, _ = hidden_states.shape
        gate, xBC, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )
        xBC, conv_state = self.short_conv(xBC, conv_state, mask, self.act)
        group_width = self.n_groups * self.ssm_state_size
        x, B, C = xBC.split([self.intermediate_size, group_width, group_width], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        low, high = self.time_step_limit
        if (low, high) != (0.0, math.inf):
            dt = dt.clamp(low, high)
        if mask is not None:
            dt = torch.where(mask[..., None], dt, 0)
        x = x.reshape(batch_size, q_len, self.num_heads, self.head_dim)
        y, final_state = ssd_scan(
            x,
            dt,
            -torch.exp(self.A_log),
            B.reshape(batch_size, q_len, self.n_groups, self.ssm_state_size),
            C.reshape(batch_size, q_len, self.n_groups, self.ssm_state_size),
            chunk_size=min(self.chunk_size, CPU_CHUNK_SIZE),
            initial_state=recurrent_state,
            output_final_state=output_final_state,
        )
        y = (y + x * self.D[:, None]).reshape(batch_size, q_len, self.intermediate_size)
        y = self._gated_norm(y, gate)
        return y, final_state, conv_state

    def _gated_norm(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The gated RMSNorm, y * silu(gate) RMS-normalised over each of the n_groups groups of
        channels, times the weight, in at least float32 (float64 kept): mamba_ssm's and transformers'
        MambaRMSNormGated from 5.23 on (5.21 and 5.22 normalise over all channels at once, the same for
        n_groups 1)."""
        norm = self.norm
        dtype = torch.promote_types(y.dtype, torch.float32)
        y = y.to(dtype) * F.silu(gate.to(dtype))
        groups = y.unflatten(-1, (self.n_groups, -1))
        groups = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight.to(dtype) * groups.flatten(-2)


def build_mamba2(
    hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any, options: dict[str, Any]
) -> CachedMamba2Mixer:
    """``build_mixer``'s builder of "mamba2": a ``CachedMamba2Mixer`` on a Mamba2Config of
    hidden_size and ``options`` (Mamba2Config fields) over, in a Mamba-2 backbone (``backbone_config``
    a Mamba2Config), the backbone's fields (its checkpoint's layout), elsewhere transformers' defaults
    with n_groups 1 (the authors' default; transformers' 8 would need 8 heads). Heads: ``num_heads``
    of width expand * hidden_size / num_heads (a Mamba-2 backbone's own head_dim when num_heads is its
    own)."""
    fields = {field.name for field in dataclasses.fields(Mamba2Config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown Mamba2Config option(s) {unknown}")
    if isinstance(backbone_config, Mamba2Config):
        if backbone_config.hidden_size != hidden_size:
            raise ValueError(
                f"hidden_size {hidden_size} differs from the Mamba2Config's {backbone_config.hidden_size}"
            )
        base = {name: getattr(backbone_config, name) for name in fields}
    else:
        # Mamba2Mixer reads config.layer_types[layer_idx]
        base = {"n_groups": 1, "num_hidden_layers": backbone_layer_count(backbone_config, layer_idx)}
    heads = options.get("num_heads", num_heads)
    values = {**base, "hidden_size": hidden_size, "num_heads": heads, **options}
    expand = values.get("expand", 2)
    width = expand * hidden_size
    if "head_dim" not in options and heads != base.get("num_heads") and isinstance(heads, int) and heads > 0:
        values["head_dim"] = width // heads
    if values.get("head_dim", 64) * values["num_heads"] != width:
        raise ValueError(
            f"num_heads ({values['num_heads']}) * head_dim ({values.get('head_dim', 64)}) must be "
            f"expand * hidden_size = {width}"
        )
    return CachedMamba2Mixer(Mamba2Config(**values), layer_idx)
