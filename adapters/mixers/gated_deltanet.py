"""Gated DeltaNet (Yang et al. 2025): fla's layer, plus a PyTorch forward for CPU tensors."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from fla.layers.gated_deltanet import GatedDeltaNet

from ttt_mixer.adapters.mixers.common import LinearAttentionTorchPath, rms_norm
from ttt_mixer.adapters.mixers.delta_rule import chunk_gated_delta_rule
from ttt_mixer.layers.checks import check_backend

# fla's l2norm kernels (fla.modules.l2norm, and the recurrent kernel's in-kernel norm): x / sqrt(|x|^2 + eps)
L2NORM_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + L2NORM_EPS)


class GatedDeltaNetMixer(LinearAttentionTorchPath, GatedDeltaNet):
    """fla's ``GatedDeltaNet`` (same arguments, parameters and cache layout) that runs anywhere.

    ``backend`` "triton" runs fla's own forward (its Triton kernels); "torch" computes the same in
    PyTorch (``chunk_gated_delta_rule``: fla's ``naive_recurrent_gated_delta_rule``, chunked): q and
    k l2-normalised, the decay g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b) (times 2 with
    ``allow_neg_eigval``); None picks Triton for CUDA tensors and PyTorch otherwise
    (TTT_MIXER_BACKEND overrides). Cache entry: ``recurrent_state`` [B, HV, V, K] in at least float32
    (fla's ``state_v_first`` layout) and, with ``use_short_conv``, ``conv_state`` = (q, k, v) windows
    [B, D, conv_size]. Padded tokens change no state (beta = 0, g = 0) and output 0. Unknown arguments
    are a TypeError (fla's own swallows them).
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        expand_v: float = 2,
        head_dim: int = 256,
        num_heads: int = 6,
        num_v_heads: int | None = None,
        mode: str = "chunk",
        use_gate: bool = True,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: int | None = None,
        norm_eps: float = 1e-5,
        output_gate_activation: str = "swish",
        backend: str | None = None,
    ) -> None:
        check_backend(backend)
        try:
            super().__init__(
                hidden_size=hidden_size,
                expand_v=expand_v,
                head_dim=head_dim,
                num_heads=num_heads,
                num_v_heads=num_v_heads,
                mode=mode,
                use_gate=use_gate,
                use_short_conv=use_short_conv,
                allow_neg_eigval=allow_neg_eigval,
                conv_size=conv_size,
                conv_bias=conv_bias,
                layer_idx=layer_idx,
                norm_eps=norm_eps,
                output_gate_activation=output_gate_activation,
            )
        except AssertionError as error:  # fla checks some arguments with asserts
            raise ValueError(f"GatedDeltaNetMixer: {error}") from error
        if self.num_v_heads < self.num_heads:
            raise ValueError(f"num_v_heads ({self.num_v_heads}) must be >= num_heads ({self.num_heads})")
        self.backend = backend

    def projection_activation(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU, as fla's layer applies it to q, k and v when they have no short convolution."""
        return F.silu(x)

    def recurrence_inputs(
        self, hidden_states: torch.Tensor, qkv: tuple[torch.Tensor, ...], mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """(q, k, v, beta, g) of ``chunk_gated_delta_rule`` (LinearAttentionTorchPath)."""
        q, k, v = qkv
        q, k = (rearrange(x, "... (h d) -> ... h d", d=self.head_k_dim) for x in (q, k))
        v = rearrange(v, "... (h d) -> ... h d", d=self.head_v_dim)
        q, k = l2_normalize(q), l2_normalize(k)
        if self.num_v_heads > self.num_heads:
            # grouped value heads: value head i reads query/key head i // (HV / H), as fla's kernels do
            groups = self.num_v_heads // self.num_heads
            q, k = q.repeat_interleave(groups, dim=-2), k.repeat_interleave(groups, dim=-2)
        beta = torch.sigmoid(self.b_proj(hidden_states).float())
        if self.allow_neg_eigval:
            beta = beta * 2
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(hidden_states).float() + self.dt_bias.float())
        if mask is not None:
            # a padded token leaves the state as it is: no write (beta 0), decay exp(0) = 1
            beta, g = torch.where(mask[..., None], beta, 0), torch.where(mask[..., None], g, 0)
        return q, k, v, beta, g

    def recurrence(self, *inputs: torch.Tensor, **state: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``chunk_gated_delta_rule`` with the layer's scale, 1 / sqrt(head_k_dim)."""
        return chunk_gated_delta_rule(*inputs, scale=self.head_k_dim**-0.5, **state)

    def output(self, o: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The gated RMSNorm (or the plain one without ``use_gate``), then o_proj."""
        norm = self.o_norm
        if self.use_gate:
            g_out = rearrange(self.g_proj(hidden_states), "... (h d) -> ... h d", d=self.head_v_dim)
            o = rms_norm(o, norm.weight, norm.bias, norm.eps, gate=g_out, activation=norm.activation)
        else:
            o = rms_norm(o, norm.weight, norm.bias, norm.eps)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)").to(hidden_states.dtype))
