"""Mamba's mixer on the fla layer interface: transformers' ``MambaMixer.forward`` with its states kept
in fla's Cache."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from fla.layers.utils import update_layer_cache
from fla.models.utils import Cache
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer
from ttt_mixer.adapters.mixers.common import cached_states, check_inputs, reject_cu_seqlens, zero_padding

# transformers 5.2x renamed MambaMixer.forward's ``cache_params`` to ``cache``
MAMBA_CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(MambaMixer.forward).parameters else "cache_params"
)


class MambaLayerState:
    """One layer's slice of transformers' linear-attention cache API, the part that
    ``MambaMixer.forward`` calls, with the semantics of transformers' ``LinearAttentionLayer``
    (record_past off). It works on clones of the states it is given, so the in-place updates of
    MambaMixer's one-token path never touch tensors the fla cache (or anyone) still holds."""

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


class CachedMambaMixer(MambaMixer):
    """transformers' ``MambaMixer`` (same parameters) with fla's forward signature.

    It runs ``MambaMixer.forward`` (the PyTorch path on CPU) with a ``MambaLayerState`` in place of
    transformers' cache. Cache entry: ``conv_state`` [B, intermediate_size, conv_kernel] and
    ``recurrent_state`` [B, intermediate_size, state_size]. transformers' full-sequence scan always
    starts from a zero state, so a continuation of several tokens runs token by token through its
    exact one-token path. Padding as transformers does it (padded inputs zeroed before and after the
    convolution): exact for left padding when ``use_bias`` is False (the default); padded positions
    output 0. Gradients do not flow through cached one-token steps (they update states in place).
    Keyword arguments other than ``cu_seqlens`` (refused) are ignored.
    """

    def __init__(self, config: MambaConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        # Mamba's own recipe (mamba_ssm) keeps weight decay off A_log and D; fla marks its A_log and
        # dt_bias the same way, and ttt_mixer.recall_gap's trainer honours the mark
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, Cache | None]:
        """hidden_states [B, T, D] -> (o [B, T, D], None, past_key_values)."""
        mask = check_inputs(self, hidden_states, attention_mask)
        reject_cu_seqlens(self, kwargs)
        batch_size, q_len, _ = hidden_states.shape
        # MambaMixer multiplies by the mask, so it must be a number
        numeric_mask = None if mask is None else mask.to(hidden_states.dtype)
        if past_key_values is None:
            o = super().forward(hidden_states, attention_mask=numeric_mask)
            return zero_padding(o, mask), None, past_key_values

        recurrent_state, conv_state = cached_states(self, past_key_values, batch_size)
        state = MambaLayerState(self.layer_idx, conv_state, recurrent_state)
        if state.get_recurrent_state(self.layer_idx) is not None and q_len > 1:
            o = torch.cat(
                [
                    super(CachedMambaMixer, self).forward(
                        hidden_states[:, t : t + 1],
                        attention_mask=None if numeric_mask is None else numeric_mask[:, t : t + 1],
                        **{MAMBA_CACHE_ARGUMENT: state},
                    )
                    for t in range(q_len)
                ],
                dim=1,
            )
        else:
            o = super().forward(hidden_states, attention_mask=numeric_mask, **{MAMBA_CACHE_ARGUMENT: state})
        update_layer_cache(
            self,
            past_key_values,
            recurrent_state=state.recurrent_state if use_cache else None,
            conv_state=state.conv_state if use_cache else None,
            offset=q_len,
        )
        return zero_padding(o, mask), None, past_key_values
