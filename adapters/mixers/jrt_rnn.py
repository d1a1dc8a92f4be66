"""JRT-RNN (Arora et al. 2024, "Just read twice"): prefix linear attention with Based's Taylor feature
map on fla's layer interface, a thin layer over ``ttt_mixer.ops.taylor_linear_attention`` (the math:
docs/math.md, section 15)."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from fla.layers.utils import update_layer_cache
from fla.models.utils import Cache
from fla.modules import ShortConvolution
from torch import nn

from ttt_mixer.adapters.mixers.common import (
    cached_states,
    check_inputs,
    conv_projections,
    masked_short_conv,
    reject_cu_seqlens,
    zero_padding,
)
from ttt_mixer.ops.taylor_linear_attention import (
    PrefixState,
    check_prefix_length,
    prefix_taylor_linear_attention,
)


class JRTRNNMixer(nn.Module):
    """Prefix linear attention: decoder projections q, k, v read causally, encoder projections
    k_enc, v_enc over each sequence's first ``prefix_length`` real tokens read by every query (one
    inside the prefix too), one normaliser over both (the authors' ``PrefixLinearAttention``, their
    ``enc_length`` our ``prefix_length``). Heads of ``feature_dim`` query/key features (Taylor map:
    1 + f + f(f+1)/2 features) and hidden_size / num_heads value features.

    Cache entry: ``recurrent_state`` = (S [B, H, F, dv], z [B, H, F], seen [B] int64) in at least
    float32 (``PrefixState``: encoder and decoder sums together, and each sequence's real tokens so
    far); with ``use_short_conv`` ``conv_state`` = the (q, k, v) windows [B, D, conv_size]. Padding
    adds nothing and outputs 0. A cached sequence continues exactly once its prefix is complete;
    continuing one whose first calls stopped inside its prefix is a ValueError. PyTorch only (no
    Triton kernel); ``cu_seqlens`` is refused.

    ``use_short_conv`` (off by default) puts fla's short convolution with SiLU on the decoder's q, k
    and v, as the project's Based layer has it, and on the encoder's k_enc and v_enc, so that the
    encoder too can bind a key to the value after it (the authors' models get that from the short
    convolution layers between their mixers). The encoder's windows are not cached: a sequence's
    encoder tokens all come in one call (a split inside the prefix is refused), after nothing but
    padding, so they always start from an empty window.
    """

    def __init__(
        self,
        hidden_size: int,
        prefix_length: int,
        num_heads: int = 12,
        feature_dim: int = 16,
        eps: float = 1e-12,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_heads", num_heads),
            ("feature_dim", feature_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.hidden_size = hidden_size
        self.prefix_length = check_prefix_length(prefix_length)
        self.num_heads = num_heads
        self.feature_dim = feature_dim
        self.head_v_dim = hidden_size // num_heads
        self.eps = eps
        self.layer_idx = layer_idx
        self.use_short_conv = use_short_conv
        key_size = num_heads * feature_dim
        self.q_proj = nn.Linear(hidden_size, key_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_enc_proj = nn.Linear(hidden_size, key_size, bias=False)
        self.v_enc_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if use_short_conv:
            self.q_conv1d, self.k_conv1d, self.v_conv1d = (
                ShortConvolution(size, conv_size, bias=conv_bias, activation="silu")
                for size in (key_size, key_size, hidden_size)
            )
            self.k_enc_conv1d, self.v_enc_conv1d = (
                ShortConvolution(size, conv_size, bias=conv_bias, activation="silu")
                for size in (key_size, hidden_size)
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, Cache | None]:
        """hidden_states [B, T, D] -> (o [B, T, D], None, past_key_values). Other keyword arguments
        (position_ids, cache_position, ...) are ignored; ``cu_seqlens`` is refused."""
        mask = check_inputs(self, hidden_states, attention_mask)
        reject_cu_seqlens(self, kwargs)
        batch_size, q_len, _ = hidden_states.shape
        state, conv_state = cached_states(self, past_key_values, batch_size)
        if self.use_short_conv:
            (q, k, v), conv_state = conv_projections(self, hidden_states, mask, conv_state, bool(use_cache))
        else:
            q, k, v = (proj(hidden_states) for proj in (self.q_proj, self.k_proj, self.v_proj))
        k_enc, v_enc = self.k_enc_proj(hidden_states), self.v_enc_proj(hidden_states)
        if self.use_short_conv:
            k_enc, v_enc = (
                masked_short_conv(conv, x, mask, None, False)[0]
                for conv, x in ((self.k_enc_conv1d, k_enc), (self.v_enc_conv1d, v_enc))
            )
        q, k, k_enc = (rearrange(x, "... (h f) -> ... h f", f=self.feature_dim) for x in (q, k, k_enc))
        v, v_enc = (rearrange(x, "... (h d) -> ... h d", d=self.head_v_dim) for x in (v, v_enc))
        o, state = prefix_taylor_linear_attention(
            q,
            k,
            v,
            k_enc,
            v_enc,
            self.prefix_length,
            mask,
            None if state is None else PrefixState(*state),
            self.eps,
        )
        update_layer_cache(
            self,
            past_key_values,
            recurrent_state=tuple(state) if use_cache else None,
            conv_state=conv_state if use_cache and self.use_short_conv else None,
            offset=q_len,
        )
        o = self.o_proj(rearrange(o, "... h d -> ... (h d)").to(hidden_states.dtype))
        return zero_padding(o, mask), None, past_key_values
