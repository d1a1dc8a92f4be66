"""Gated Linear Attention (Yang et al. 2024): fla's layer, plus a PyTorch forward for CPU tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from fla.layers.gla import GatedLinearAttention
from fla.ops.gla.naive import naive_recurrent_gla

from ttt_mixer.adapters.mixers.common import LinearAttentionTorchPath, rms_norm, torch_activation
from ttt_mixer.layers.checks import check_backend


class GLAMixer(LinearAttentionTorchPath, GatedLinearAttention):
    """fla's ``GatedLinearAttention`` (same arguments, parameters and cache layout) that runs anywhere.

    ``backend`` "triton" runs fla's own forward (its Triton kernels); "torch" computes the same in
    PyTorch with fla's ``naive_recurrent_gla``; None picks Triton for CUDA tensors and PyTorch
    otherwise (the TTT_MIXER_BACKEND environment variable overrides, as for the TTT layer).
    Cache entry: ``recurrent_state`` [B, H, V, K] float32 (fla's ``state_v_first`` layout) and, with
    ``use_short_conv``, ``conv_state`` = (q, k, v) windows [B, D, conv_size]. Padded tokens change no
    state and output 0. ``mode="fused_chunk"`` is refused: fla stores that mode's state as [B, H, K, V],
    which would not continue from the other modes' states.
    """

    recurrence = staticmethod(naive_recurrent_gla)

    def __init__(
        self,
        mode: str = "chunk",
        hidden_size: int = 1024,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        feature_map: str | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_output_gate: bool = True,
        gate_fn: str = "swish",
        elementwise_affine: bool | None = True,
        norm_eps: float = 1e-5,
        gate_logit_normalizer: int = 16,
        gate_low_rank_dim: int = 16,
        clamp_min: float | None = None,
        fuse_norm: bool = True,
        layer_idx: int | None = None,
        backend: str | None = None,
    ) -> None:
        if mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"mode must be 'chunk' or 'fused_recurrent', got {mode!r}")
        if feature_map is not None:
            torch_activation(feature_map, "feature_map")
        torch_activation(gate_fn, "gate_fn")
        check_backend(backend)
        try:
            super().__init__(
                mode=mode,
                hidden_size=hidden_size,
                expand_k=expand_k,
                expand_v=expand_v,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                feature_map=feature_map,
                use_short_conv=use_short_conv,
                conv_size=conv_size,
                conv_bias=conv_bias,
                use_output_gate=use_output_gate,
                gate_fn=gate_fn,
                elementwise_affine=elementwise_affine,
                norm_eps=norm_eps,
                gate_logit_normalizer=gate_logit_normalizer,
                gate_low_rank_dim=gate_low_rank_dim,
                clamp_min=clamp_min,
                fuse_norm=fuse_norm,
                layer_idx=layer_idx,
            )
        except AssertionError as error:  # fla checks its arguments with asserts
            raise ValueError(f"GLAMixer: {error}") from error
        self.feature_map_name = feature_map
        self.gate_fn_name = gate_fn
        self.backend = backend

    def recurrence_inputs(
        self, hidden_states: torch.Tensor, qkv: tuple[torch.Tensor, ...], mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """(q, k, v, gk) of ``naive_recurrent_gla`` (LinearAttentionTorchPath)."""
        q, k, v = qkv
        gk = self.gk_proj(hidden_states)

        q = rearrange(q, "... (h d) -> ... h d", d=self.head_k_dim)
        # kv heads repeat consecutively (fla's '(h g)'), i.e. repeat_interleave
        k, gk = (rearrange(x, "... (h d) -> ... h d", d=self.head_k_dim) for x in (k, gk))
        v = rearrange(v, "... (h d) -> ... h d", d=self.head_v_dim)
        if self.num_kv_groups > 1:
            k, gk, v = (x.repeat_interleave(self.num_kv_groups, dim=-2) for x in (k, gk, v))
        gk = F.logsigmoid(gk) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = torch.clamp_min(gk, self.clamp_min)
        if self.feature_map_name is not None:
            feature_map = torch_activation(self.feature_map_name, "feature_map")
            q, k = feature_map(q), feature_map(k)
        if mask is not None:
            # a padded token leaves the state as it is: no key/value, decay exp(0) = 1
            m = mask[..., None, None]
            k, v, gk = (torch.where(m, x, 0) for x in (k, v, gk))
        return q, k, v, gk

    def output(self, o: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The RMSNorm and output gate (fused or not, or none without ``use_output_gate``), then o_proj."""
        if self.use_output_gate:
            g = self.g_proj(hidden_states)
            if self.fuse_norm_and_gate:
                g = rearrange(g, "... (h d) -> ... h d", d=self.head_v_dim)
                norm = self.g_norm_swish_gate
                o = rms_norm(o, norm.weight, norm.bias, norm.eps, gate=g, activation="swish")
                o = rearrange(o, "... h d -> ... (h d)")
            else:
                o = rearrange(
                    rms_norm(o, self.g_norm.weight, self.g_norm.bias, self.g_norm.eps), "... h d -> ... (h d)"
                )
                o = o * torch_activation(self.gate_fn_name, "gate_fn")(g)
        else:
            o = rearrange(
                rms_norm(o, self.g_norm.weight, self.g_norm.bias, self.g_norm.eps), "... h d -> ... (h d)"
            )
        return self.o_proj(o)
