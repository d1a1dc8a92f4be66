"""The fla layer plumbing of the TTT layers, written once: fla's ``forward`` signature and return
value, the input checks, padding masks and ``cu_seqlens`` handled the fla way (unpad, run packed,
repad) and the recurrent state kept in fla's ``Cache`` through fla's helpers."""

from __future__ import annotations

import torch
from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache
from fla.models.utils import Cache
from torch import nn

from ttt_mixer.layers.checks import check_cache_batch, check_hidden_states, padding_mask
from ttt_mixer.ops import state_position
from ttt_mixer.ops.ttt.checks import check_cu_seqlens


def one_token_each(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> bool:
    """Whether every sequence of a call has at most one token (x [B, T, ...], packed with
    ``cu_seqlens``), so that the decode step serves it."""
    return x.shape[1] == 1 if cu_seqlens is None else bool((cu_seqlens.diff() <= 1).all())


class PackedMixerLayer(nn.Module):
    """fla's layer ``forward`` around a mixer that runs packed sequences. The subclass sets
    ``hidden_size`` and ``q_proj`` (whose weight's dtype is the layer's) and defines
    ``mix(x, recurrent_state, conv_state, use_cache, cu_seqlens) -> (o [..., D], recurrent_state,
    conv_state)`` on the unpadded input, its output projection included."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None, Cache | None]:
        """hidden_states [B, T, D] -> (o [B, T, D], None, past_key_values). ``cu_seqlens`` in kwargs
        marks packed sequences (batch size 1); ``cache_offset`` in kwargs is the number of positions
        this call adds to the cache's length (default T: a model that packs a padded batch before its
        layers passes the padded length); other fla keyword arguments are accepted and unused."""
        batch_size, q_len = check_hidden_states(
            type(self).__name__, hidden_states, self.hidden_size, self.q_proj.weight.dtype
        )
        attention_mask = None if padding_mask(attention_mask, batch_size, q_len) is None else attention_mask
        if kwargs.get("cu_seqlens") is not None:
            check_cu_seqlens(kwargs["cu_seqlens"], batch_size, q_len, "hidden_states")
            if attention_mask is not None:
                raise ValueError(
                    "give either cu_seqlens (packed input) or a padding attention_mask, not both"
                )

        entry = get_layer_cache(self, past_key_values)
        x, indices, cu_seqlens = unpad_hidden_states(
            hidden_states, kwargs.get("cu_seqlens"), attention_mask, q_len
        )
        num_sequences = batch_size if cu_seqlens is None else cu_seqlens.numel() - 1
        # the entry may exist without our states: a block-level sublayer can write it first
        recurrent_state = entry["recurrent_state"] if entry is not None else None
        conv_state = entry["conv_state"] if entry is not None else None
        if recurrent_state is not None:
            # every TTT state (TTT's and the family's) begins with the positions [N], one per sequence
            check_cache_batch(type(self).__name__, state_position(recurrent_state).shape[0], num_sequences)
        o, recurrent_state, conv_state = self.mix(x, recurrent_state, conv_state, bool(use_cache), cu_seqlens)
        update_layer_cache(
            self,
            past_key_values,
            recurrent_state=recurrent_state,
            conv_state=conv_state,
            offset=q_len if kwargs.get("cache_offset") is None else kwargs["cache_offset"],
        )
        return repad_hidden_states(o, indices, batch_size, q_len), None, past_key_values
