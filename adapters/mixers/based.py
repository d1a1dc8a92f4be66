"""Based (Arora et al. 2024): linear attention with a second-order Taylor feature map, normalised;
fla's layer with a recurrent state, a padding mask, an optional short convolution and a PyTorch path."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from fla.layers.based import BasedLinearAttention
from fla.layers.utils import update_layer_cache
from fla.models.utils import Cache
from fla.modules import ShortConvolution
from fla.ops.based import parallel_based
from fla.ops.linear_attn import chunk_linear_attn, fused_chunk_linear_attn

from ttt_mixer.adapters.mixers.common import (
    at_least_float32,
    cached_states,
    check_inputs,
    conv_projections,
    reject_cu_seqlens,
    zero_padding,
)
from ttt_mixer.layers.checks import check_backend, resolve_backend
from ttt_mixer.ops.taylor_linear_attention import taylor_linear_attention

# the epsilon added to the normaliser by fla's causal kernels: parallel_based adds 1e-6, the
# linear-attention kernels of the chunk modes 1e-10 (``eps``, 1e-12, is only forward_reference's)
KERNEL_EPS = {"parallel": 1e-6, "chunk": 1e-10, "fused_chunk": 1e-10}


class BasedMixer(BasedLinearAttention):
    """fla's ``BasedLinearAttention`` (same parameters) on the fla layer interface, causal only.

    o_t = phi(q_t) . S_t / (phi(q_t) . z_t + eps) with S_t = sum_{s<=t} phi(k_s) v_s^T and
    z_t = sum_{s<=t} phi(k_s); eps is what the layer's fla kernel adds (``mode`` "parallel": 1e-6,
    else 1e-10). Cache entry: ``recurrent_state`` = (S [B, H, F, dv], z [B, H, F]) in at least float32, F = 1 + f +
    f(f+1)/2, and with ``use_short_conv`` ``conv_state`` = (q, k, v) windows [B, D, conv_size]. Padded
    tokens add nothing to S and z and output 0. ``backend`` "triton" runs fla's kernel of ``mode``
    where it can (no padding, no cache: fla's kernels here keep no state), else the PyTorch path.

    ``use_short_conv`` (off by default, as in fla's layer) puts fla's short convolution with SiLU on
    q, k and v, as fla's GLA and DeltaNet layers have it: the Based architecture pairs its linear
    attention with short convolutions (Zoology's Based layers mix a BaseConv into every layer), which
    let a layer bind a key to the token after it.
    """

    def __init__(
        self,
        hidden_size: int,
        feature_dim: int = 16,
        num_key_value_heads: int | None = None,
        num_heads: int = 12,
        feature_name: str = "taylor_exp",
        eps: float = 1e-12,
        causal: bool = True,
        mode: str = "parallel",
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: int | None = None,
        backend: str | None = None,
    ) -> None:
        if not causal:
            raise ValueError("causal must be True: a language-model mixer cannot look ahead")
        check_backend(backend)
        try:
            super().__init__(
                hidden_size=hidden_size,
                feature_dim=feature_dim,
                num_key_value_heads=num_heads if num_key_value_heads is None else num_key_value_heads,
                num_heads=num_heads,
                feature_name=feature_name,
                eps=eps,
                causal=causal,
                mode=mode,
            )
        except AssertionError as error:  # fla checks its arguments with asserts
            raise ValueError(f"BasedMixer: {error}") from error
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.layer_idx = layer_idx
        self.backend = backend
        self.kernel_eps = KERNEL_EPS[mode]
        self.use_short_conv = use_short_conv
        if use_short_conv:
            key_size, value_size = num_heads * self.head_k_dim, num_heads * self.head_v_dim
            self.q_conv1d, self.k_conv1d, self.v_conv1d = (
                ShortConvolution(size, conv_size, bias=conv_bias, activation="silu")
                for size in (key_size, key_size, value_size)
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
        q, k = (rearrange(x, "... (h d) -> ... h d", d=self.head_k_dim) for x in (q, k))
        v = rearrange(v, "... (h d) -> ... h d", d=self.head_v_dim)
        stateless = mask is None and state is None and not use_cache and past_key_values is None
        if stateless and resolve_backend(self.backend, hidden_states.device) == "triton":
            o = self.fla_attention(q, k, v)
        else:
            o, state = taylor_linear_attention(q, k, at_least_float32(v), mask, state, self.kernel_eps)
            update_layer_cache(
                self,
                past_key_values,
                recurrent_state=state if use_cache else None,
                conv_state=conv_state if use_cache and self.use_short_conv else None,
                offset=q_len,
            )
        o = self.o_proj(rearrange(o, "... h d -> ... (h d)").to(hidden_states.dtype))
        return zero_padding(o, mask), None, past_key_values

    def fla_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """fla's causal kernel of ``mode`` (Triton), as fla's layer calls it: q, k [B, T, H, f],
        v [B, T, H, dv] -> o [B, T, H, dv]."""
        if self.mode == "parallel":
            return parallel_based(q=q, k=k, v=v, scale=self.head_k_dim**-0.5, use_norm=True)
        attention = chunk_linear_attn if self.mode == "chunk" else fused_chunk_linear_attn
        o, _ = attention(q=self.feature_map(q), k=self.feature_map(k), v=v, scale=1, normalize=True)
        return o
