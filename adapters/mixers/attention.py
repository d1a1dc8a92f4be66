"""Llama's attention on the fla layer interface, its keys and values in fla's Cache."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from fla.layers.utils import get_layer_cache, update_layer_cache
from fla.models.utils import Cache
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

from ttt_mixer.adapters.mixers.common import check_inputs, config_with, reject_cu_seqlens, zero_padding
from ttt_mixer.layers.checks import check_cache_batch
from ttt_mixer.models.packing import checked_position_ids


class CachedAttention(LlamaAttention):
    """transformers' ``LlamaAttention`` (same parameters and state_dict) with fla's forward signature.

    Causal softmax attention with GQA and Llama's RoPE (``rotary_emb``, buffers only, not saved).
    Positions of the new tokens: the ``position_embeddings`` (cos, sin) if given, else
    ``position_ids``, else the real tokens counted so far (cached and new) minus one, so that a
    left-padded sequence gets the positions it has alone. Cache entry: ``attn_state`` = (keys, values
    [B, L, H_kv * head_dim] after RoPE, as fla's Attention stores them, and a [B, L] bool mask of
    which cached tokens are real), so only the mask's last T columns are read. Padded queries output 0.
    ``cache_position`` and other generation keyword arguments are ignored; ``cu_seqlens`` is refused.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int | None = None) -> None:
        super().__init__(config, layer_idx)
        qkv_bias = getattr(config, "qkv_bias", config.attention_bias)
        if qkv_bias != config.attention_bias:
            # Qwen2's layout: biases on q/k/v, none on o; LlamaAttention gives all four the same
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(self, name)
                setattr(self, name, torch.nn.Linear(old.in_features, old.out_features, bias=qkv_bias))
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Cache | None]:
        """hidden_states [B, T, D] -> (o [B, T, D], weights [B, H, T, L] with ``output_attentions``
        else None, past_key_values). Keys and values join the cache whenever one is given (as in
        fla's Attention)."""
        mask = check_inputs(self, hidden_states, attention_mask)
        reject_cu_seqlens(self, kwargs)
        batch_size, q_len, _ = hidden_states.shape
        entry = get_layer_cache(self, past_key_values)
        past = entry.get("attn_state") if entry is not None else None
        if past is not None:
            check_cache_batch(type(self).__name__, past[0].shape[0], batch_size)

        shape = (batch_size, q_len, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        real = torch.ones(batch_size, q_len, dtype=torch.bool, device=q.device) if mask is None else mask
        if position_embeddings is None:
            positions = self.positions(real, past, position_ids)
            position_embeddings = self.rotary_emb(hidden_states, positions)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)

        k_all, v_all, real_all = k, v, real
        if past_key_values is not None:
            state = (k.flatten(-2), v.flatten(-2), real)
            k_all, v_all, *rest = update_layer_cache(self, past_key_values, attn_state=state, offset=q_len)[
                "attn_state"
            ]
            # an entry written without our mask (fla's own Attention) has only real tokens
            real_all = rest[0] if rest else torch.ones(k_all.shape[:2], dtype=torch.bool, device=q.device)
            k_all, v_all = (x.unflatten(-1, (-1, self.head_dim)) for x in (k_all, v_all))

        num_keys = k_all.shape[1]
        # query i sits at cache position num_keys - q_len + i and sees real keys up to there; its own
        # key is always allowed, so that a padded query's row is never empty (softmax would give NaN)
        query_at = torch.arange(num_keys - q_len, num_keys, device=q.device)[:, None]
        key_at = torch.arange(num_keys, device=q.device)[None, :]
        allowed = ((key_at <= query_at) & real_all[:, None, None, :]) | (key_at == query_at)
        keys = repeat_kv(k_all.transpose(1, 2), self.num_key_value_groups)
        values = repeat_kv(v_all.transpose(1, 2), self.num_key_value_groups)
        dropout = self.attention_dropout if self.training else 0.0
        weights = None
        if output_attentions:
            # the weights themselves are asked for: the explicit softmax, which SDPA does not return
            scores = (q.transpose(1, 2) @ keys.transpose(-1, -2)) * self.scaling
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            o = F.dropout(weights, dropout, self.training) @ values
        else:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=allowed, dropout_p=dropout, scale=self.scaling
            )
        o = self.o_proj(o.transpose(1, 2).reshape(batch_size, q_len, -1))
        return zero_padding(o, mask), weights, past_key_values

    def positions(
        self, real: torch.Tensor, past: tuple[torch.Tensor, ...] | None, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """[B, T] RoPE positions of the new tokens (see the class docstring)."""
        batch_size, q_len = real.shape
        if position_ids is not None:
            return checked_position_ids(position_ids, batch_size, q_len)
        if past is None:
            seen = real.new_zeros(batch_size, dtype=torch.long)
        elif len(past) > 2:
            seen = past[2].sum(-1)
        else:
            seen = torch.full((batch_size,), past[0].shape[1], dtype=torch.long, device=real.device)
        return (seen[:, None] + real.long().cumsum(-1) - 1).clamp_min(0)


def build_attention(
    hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any, options: dict[str, Any]
) -> CachedAttention:
    """``build_mixer``'s builder of "attention": ``CachedAttention`` on ``backbone_config`` when it is
    a LlamaConfig, else on a LlamaConfig of hidden_size and num_heads; ``options`` are LlamaConfig
    fields (e.g. rope_theta, num_key_value_heads)."""
    if isinstance(backbone_config, LlamaConfig):
        if (backbone_config.hidden_size, backbone_config.num_attention_heads) != (hidden_size, num_heads):
            raise ValueError(
                f"hidden_size {hidden_size} and num_heads {num_heads} differ from the LlamaConfig's "
                f"({backbone_config.hidden_size}, {backbone_config.num_attention_heads})"
            )
        config = config_with(LlamaConfig, backbone_config, options, {}) if options else backbone_config
    else:
        defaults = {
            "hidden_size": hidden_size,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
        }
        config = config_with(LlamaConfig, None, options, defaults)
    return CachedAttention(config, layer_idx)
