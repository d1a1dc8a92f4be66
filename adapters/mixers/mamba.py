"""Mamba's mixer on the fla layer interface: transformers' ``MambaMixer`` computed with an exact,
fast PyTorch scan (``selective_scan``), its states kept in fla's Cache."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MambaConfig
from transformers import initialization as init
from transformers.models.mamba.modeling_mamba import MambaMixer
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from ttt_mixer.adapters.mixers.common import ScanMixerMixin, backbone_layer_count, config_with
from ttt_mixer.adapters.mixers.selective_scan import selective_scan
from ttt_mixer.layers.checks import check_finite_float, check_positive_float

# transformers 5.2x renamed MambaMixer.forward's ``cache_params`` to ``cache``
MAMBA_CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(MambaMixer.forward).parameters else "cache_params"
)


class MambaLayerState:
    """One layer's slice of transformers' linear-attention cache API, the part that
    ``MambaMixer.forward`` calls, with the semantics of transformers' ``LinearAttentionLayer``
    (record_past off): it runs transformers' own forward on states kept in fla's Cache
    (``CachedMambaMixer`` computes the same without it). It works on clones of the states it is given,
    so the in-place updates of MambaMixer's one-token path never touch tensors the fla cache (or anyone)
    still holds."""

    def __init__(self, layer_idx: int, conv_state: torch.Tensor | None, recurrent_state: torch.Tensor | None):
        self.layer_idx = layer_idx
        self.conv_state = None if conv_state is None else conv_state.clone()
        self.recurrent_state = None if recurrent_state is None else recurrent_state.clone()

    def _check(self, layer_idx: int) -> None:
        if layer_idx != self.layer_idx:
            raise ValueError(f"this state belongs to layer {self.layer_idx}, not {layer_idx}")

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.conv_state is not None

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        self._check(layer_idx)
        return self.conv_state

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        self._check(layer_idx)
        # transformers returns the recurrent state only once a conv state marks a previous pass
        return self.recurrent_state if self.conv_state is not None else None

    def update_conv_state(
        self,
        conv_states: torch.Tensor,
        layer_idx: int,
        state_idx: int = 0,
        conv_kernel_size: int | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Keeps the last ``conv_kernel_size`` inputs; returns the previous window followed by the new
        inputs (left-padded with zeros on a first pass shorter than the kernel), which the causal conv
        runs over."""
        self._check(layer_idx)
        width = conv_states.shape[-1] if conv_kernel_size is None else conv_kernel_size
        if self.conv_state is None:
            full = conv_states
            if full.shape[-1] < width:
                full = F.pad(full, (width - full.shape[-1], 0))
        else:
            full = torch.cat([self.conv_state.to(conv_states.dtype), conv_states], dim=-1)
        self.conv_state = full[..., -width:].clone()
        return full

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **_: Any
    ) -> torch.Tensor:
        self._check(layer_idx)
        self.recurrent_state = recurrent_states
        return recurrent_states


@torch.no_grad()
def init_as_transformers(mixer: MambaMixer | Mamba2Mixer) -> None:
    """What ``MambaPreTrainedModel`` and ``Mamba2PreTrainedModel`` do to their mixers, with the
    mixer's own config: every Linear N(0, initializer_range) with zero bias (transformers' 0.1,
    where the backbone's init may be Llama's 0.02: at 0.02 Mamba-2 did not leave the unigram
    plateau of the CPU recall gap), the S4D A, D and dt init, Kaiming conv and out_proj, the
    latter scaled by 1/sqrt(num_hidden_layers) under ``rescale_prenorm_residual`` (the builders give
    the mixer's config the backbone's layer count)."""
    config = mixer.config
    for linear in (m for m in mixer.modules() if isinstance(m, nn.Linear)):
        init.normal_(linear.weight, std=config.initializer_range)
        if linear.bias is not None:
            init.zeros_(linear.bias)
    if isinstance(mixer, MambaMixer):
        mixer.init_mamba_weights()
    else:
        mixer.init_mamba2_weights()
    init.kaiming_uniform_(mixer.conv1d.weight, a=math.sqrt(5))
    if mixer.conv1d.bias is not None:
        init.zeros_(mixer.conv1d.bias)
    init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
    if config.rescale_prenorm_residual:
        mixer.out_proj.weight /= math.sqrt(config.num_hidden_layers)


def rounded_as_transformers(exact: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` (what transformers computes through float32), with the gradient of ``exact`` when
    that is float64: the values of transformers' forward, and gradients in the model's precision
    rather than accumulated in float32. In any other dtype, ``rounded`` itself."""
    if exact.dtype != torch.float64:
        return rounded
    # exact + (rounded - exact) is rounded exactly: the two are within a factor of two
    return exact + (rounded.to(exact.dtype) - exact).detach()


class CachedMambaMixer(ScanMixerMixin, MambaMixer):
    """transformers' ``MambaMixer`` (same parameters and initialisation) with fla's forward signature,
    computing what ``MambaMixer.forward``'s PyTorch path computes through ``selective_scan``, a scan
    with an initial state and a hand-written backward: fast on CPU, differentiable through cached
    states, and a cached continuation of any length runs in one call.

    The numbers of transformers' full-sequence path in float32 and float64: in a float64 model it
    computes A, D and the dt bias through float32 and rounds u and B to float32 where they enter the
    state; here too, but with float64 gradients (``rounded_as_transformers``), where transformers'
    accumulate in float32. (transformers' one-token path also rounds the state to float32; this
    one does not.) Cache entry: ``conv_state`` [B, intermediate_size, conv_kernel] (the last
    conv_kernel inputs of the convolution) and ``recurrent_state`` [B, intermediate_size, state_size].
    Padded tokens are skipped: they change no state (dt 0) and no convolution window, and output 0;
    for left padding that is what transformers computes too (it zeroes padded inputs; exact there
    when ``use_bias`` is False, the default). Keyword arguments other than ``cu_seqlens`` (refused)
    are ignored.
    """

    def __init__(
        self, config: MambaConfig, layer_idx: int = 0, A_init: float | None = None, D_init: float = 1.0
    ) -> None:
        """``A_init``: every entry of A starts at -A_init (Mamba-2's single head starts at -1) instead
        of the S4D-real -(1, ..., state_size) of transformers and mamba_ssm (None, the default).
        ``D_init``: the skip D starts at D_init everywhere (transformers' and mamba_ssm's 1, the
        default; 0 starts the mixer with its scan alone)."""
        if A_init is not None:
            check_positive_float("A_init", A_init)
        check_finite_float("D_init", D_init)
        # MambaMixer's constructor initialises through init_mamba_weights, which reads both
        self.A_init, self.D_init = A_init, D_init
        super().__init__(config, layer_idx)
        # Mamba's own recipe (mamba_ssm) keeps weight decay off A_log and D; fla marks its A_log and
        # dt_bias the same way, and ttt_mixer.recall_gap's trainer honours the mark
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def reset_parameters(self) -> None:
        """The start transformers' Mamba model gives its mixers (``init_as_transformers``): what a
        backbone's init calls after its own, so that the mixer starts alike in any backbone."""
        init_as_transformers(self)

    @torch.no_grad()
    def init_mamba_weights(self) -> None:
        """transformers' init of A, D and dt, with A set to -A_init throughout when that is given and D
        to D_init."""
        super().init_mamba_weights()
        if self.A_init is not None:
            init.constant_(self.A_log, math.log(self.A_init))
        init.constant_(self.D, self.D_init)

    def scan_forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        recurrent_state: torch.Tensor | None,
        conv_state: torch.Tensor | None,
        output_final_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """in_proj -> (x, gate), x through the conv and activation, the selective scan, the D skip and
        the SiLU(gate) gate: what ScanMixerMixin feeds to out_proj."""
        x, gate = self.in_proj(hidden_states).chunk(2, dim=-1)
        x, conv_state = self.short_conv(x, conv_state, mask, self.act)
        time_step, B, C = torch.split(
            self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
        )
        # transformers' numbers: A, D and the dt bias from float32 copies, u and B rounded to float32
        # where they enter the state (no-ops in float32)
        dt_bias = rounded_as_transformers(self.dt_proj.bias, self.dt_proj.bias.float())
        dt = F.softplus(F.linear(time_step, self.dt_proj.weight) + dt_bias)
        if mask is not None:
            dt = torch.where(mask[..., None], dt, 0)
        y, final_state = selective_scan(
            rounded_as_transformers(x, x.float()),
            dt,
            rounded_as_transformers(-torch.exp(self.A_log), -torch.exp(self.A_log.float())),
            rounded_as_transformers(B, B.float()),
            C,
            initial_state=recurrent_state,
            output_final_state=output_final_state,
        )
        y = (y + x * rounded_as_transformers(self.D, self.D.float())) * F.silu(gate)
        return y, final_state, conv_state


def build_mamba(
    hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any, options: dict[str, Any]
) -> CachedMambaMixer:
    """``build_mixer``'s builder of "mamba": ``CachedMambaMixer`` on ``backbone_config`` when it is a
    MambaConfig, else on a MambaConfig of hidden_size (num_heads unused); ``options`` are MambaConfig
    fields (e.g. state_size, expand, conv_kernel) and ``CachedMambaMixer``'s ``A_init`` and
    ``D_init``."""
    options = dict(options)
    # the mixer's, not MambaConfig fields
    inits = {name: options.pop(name) for name in ("A_init", "D_init") if name in options}
    if isinstance(backbone_config, MambaConfig):
        if backbone_config.hidden_size != hidden_size:
            raise ValueError(
                f"hidden_size {hidden_size} differs from the MambaConfig's {backbone_config.hidden_size}"
            )
        config = config_with(MambaConfig, backbone_config, options, {}) if options else backbone_config
    else:
        defaults = {
            "hidden_size": hidden_size,
            "num_hidden_layers": backbone_layer_count(backbone_config, layer_idx),
        }
        config = config_with(MambaConfig, None, options, defaults)
    if not 0 <= layer_idx < config.num_hidden_layers:
        raise ValueError(
            f"layer_idx {layer_idx} is outside the MambaConfig's {config.num_hidden_layers} layers"
        )
    return CachedMambaMixer(config, layer_idx, **inits)
