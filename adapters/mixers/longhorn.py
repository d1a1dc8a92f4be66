"""Longhorn (Liu et al. 2024, "Longhorn: State Space Models are Amortized Online Learners") on the
fla layer interface, in PyTorch.

Each channel d of the inner width keeps a state S[d] in R^N and takes, per token, the closed-form
step of an online regression of x_t[d] on the key k_t (the implicit online-learning update, no
forget gate):

    beta_t  = sigmoid(W_dt dt_t + b_dt)                  [D], the rate
    delta_t = beta_t / (1 + beta_t |k_t|^2)              [D], normalised by the key's squared norm
    S_t     = (1 - delta_t k_t^2) * S_{t-1} + (delta_t x_t) k_t       (k_t^2 elementwise)
    y_t     = S_t q_t + D * x_t,      o_t = out_proj(y_t * silu(z_t))

with x, z = in_proj(h) split in two, x through a causal depthwise convolution (width 4) and SiLU,
and (dt, k, q) = x_proj(x) split [dt_rank, N, N]: Mamba's block with Longhorn's scan in place of
the selective scan. Parameter names and shapes follow the authors' ``Longhorn`` module
(github.com/Cranial-XIX/longhorn, models/longhorn.py; their CUDA kernel and
``selective_scan_online7_ref`` agree on the step above): ``in_proj``, ``conv1d``, ``x_proj``,
``dt_head``, ``out_proj``, ``D``; defaults d_state 16, d_conv 4, expand 2, dt_rank ceil(hidden / 16),
conv bias on, no projection biases.

Not pinned down, and chosen here:
  * Initialisation. The authors' module keeps PyTorch's default init for its layers (their dt_min,
    dt_max, dt_init, dt_scale, dt_init_floor arguments are unused, unlike Mamba's dt_proj init) and
    their LM's init zeroes every Linear bias, so dt_head's bias starts at 0 (rate sigmoid(0) = 1/2);
    this module zeroes it too. The LM's rescaling of out_proj by 1/sqrt(n_layer) is a model-level
    step left to the backbone, whose own init (Llama's, in ``swap_mixer``'s models) applies anyway.
    ``initializer_range``, ``dt_bias_init`` and ``D_init`` change that start (the recall-gap CPU
    preset's: N(0, 0.1) projections, rates near sigmoid(-3) and the skip D at 0 instead of 1;
    docs/recall_gap.md).
  * Precision: their scan runs in float32 and casts back; here in at least float32 (float64 stays
    float64).
  * Final state and decoding: their reference captures the "last" state at index d_state - 1 instead
    of the last token, and their decoding cache reads a ``dt_proj`` the module does not have; here the
    final state is the last token's and a continuation of any length runs from the cached states.
  * Padding: they have none; here padded tokens are skipped exactly (rate 0, no convolution window
    holds them) and output 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttt_mixer.adapters.mixers.common import ScanMixerMixin, at_least_float32
from ttt_mixer.adapters.mixers.selective_scan import online_scan
from ttt_mixer.layers.checks import check_finite_float, check_int, check_positive_float


def longhorn_delta(dt: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The normalised step delta = beta / (1 + beta |k|^2), beta = sigmoid(dt): dt [B, T, D] (bias
    included), k [B, T, N] -> [B, T, D], in at least float32."""
    dt = at_least_float32(dt)
    beta = torch.sigmoid(dt)
    return beta / (1 + beta * k.to(dt.dtype).square().sum(-1, keepdim=True))


def longhorn_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Longhorn's scan: x, dt [B, T, D] (dt the rate's logit, bias included), k, q [B, T, N],
    initial_state [B, D, N] -> (y [B, T, D] = S_t q_t, final state or None); no skip, no gate."""
    return online_scan(x, longhorn_delta(dt, k), k, q, initial_state, output_final_state)


def longhorn_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``longhorn_scan`` token by token, in plain autograd: (y [B, T, D], final state [B, D, N])."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, dt.dtype), torch.float32)
    x, dt, k, q = (t.to(dtype) for t in (x, dt, k, q))
    if initial_state is None:
        state = x.new_zeros(x.shape[0], x.shape[2], k.shape[2])
    else:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(x.shape[1]):
        beta = torch.sigmoid(dt[:, t])  # [B, D]
        key = k[:, t]  # [B, N]
        delta = beta / (1 + beta * (key * key).sum(-1, keepdim=True))
        forget = 1 - delta[:, :, None] * (key * key)[:, None, :]
        state = forget * state + (delta * x[:, t])[:, :, None] * key[:, None, :]
        outputs.append((state * q[:, t, None, :]).sum(-1))
    return torch.stack(outputs, 1), state


class LonghornMixer(ScanMixerMixin, nn.Module):
    """Longhorn's mixer (see the module docstring) with fla's layer interface:

        mixer(hidden_states [B, T, hidden_size], attention_mask=None, past_key_values=None,
              use_cache=False, output_attentions=False, **kwargs) -> (o [B, T, hidden_size], None, cache)

    Cache entry (fla's Cache at ``layer_idx``): ``conv_state`` [B, d_inner, d_conv], the last d_conv
    inputs of the convolution, and ``recurrent_state`` [B, d_inner, d_state], in at least float32.
    Exact for any prefill/continuation split; padded tokens change no state and output 0. Keyword
    arguments other than ``cu_seqlens`` (refused) are ignored.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        conv_bias: bool = True,
        bias: bool = False,
        initializer_range: float | None = None,
        dt_bias_init: float = 0.0,
        D_init: float = 1.0,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("d_state", d_state), ("d_conv", d_conv)):
            check_int(name, value)
        check_int("expand", expand)
        if dt_rank != "auto":
            check_int("dt_rank", dt_rank)
        if initializer_range is not None:
            check_positive_float("initializer_range", initializer_range)
        check_finite_float("dt_bias_init", dt_bias_init)
        check_finite_float("D_init", D_init)
        self.initializer_range = initializer_range
        self.dt_bias_init = dt_bias_init
        self.D_init = D_init
        self.hidden_size = hidden_size
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * hidden_size
        self.dt_rank = math.ceil(hidden_size / 16) if dt_rank == "auto" else dt_rank
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(hidden_size, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_head = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=bias)
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.D._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The rate head's bias to ``dt_bias_init`` (the authors': 0, a rate of 1/2), the skip D to
        ``D_init`` (the authors': 1), and with ``initializer_range`` the in, x and out projections
        to N(0, initializer_range); without it they keep their init (PyTorch's, or a backbone's when
        a model initialises its layers). The rate head's weight keeps its init either way, so every
        channel's rate starts near sigmoid(dt_bias_init)."""
        nn.init.constant_(self.dt_head.bias, self.dt_bias_init)
        nn.init.constant_(self.D, self.D_init)
        if self.initializer_range is not None:
            for linear in (self.in_proj, self.x_proj, self.out_proj):
                nn.init.normal_(linear.weight, 0.0, self.initializer_range)

    def scan_forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        recurrent_state: torch.Tensor | None,
        conv_state: torch.Tensor | None,
        output_final_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """in_proj -> (x, z), x through the conv and SiLU, Longhorn's scan, the D skip and the SiLU(z)
        gate: what ScanMixerMixin feeds to out_proj."""
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        x, conv_state = self.short_conv(x, conv_state, mask, F.silu)
        dt, k, q = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = longhorn_delta(self.dt_head(dt), k)
        if mask is not None:
            delta = torch.where(mask[..., None], delta, 0)
        y, final_state = online_scan(
            x,
            delta,
            k,
            q,
            initial_state=recurrent_state,
            output_final_state=output_final_state,
        )
        y = (y + x * self.D) * F.silu(z)
        return y, final_state, conv_state


def build_longhorn(
    hidden_size: int, num_heads: int, layer_idx: int, backbone_config: Any, options: dict[str, Any]
) -> LonghornMixer:
    """``build_mixer``'s builder of "longhorn": ``LonghornMixer`` with the authors' defaults
    (num_heads unused), ``options`` its arguments."""
    return LonghornMixer(hidden_size=hidden_size, layer_idx=layer_idx, **options)
