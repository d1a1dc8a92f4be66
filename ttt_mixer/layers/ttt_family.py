"""Titans and LaCT as flash-linear-attention layers, on the TTT-family op (docs/math.md section 13).

Both keep fla's forward signature and their state in fla's ``Cache`` (``recurrent_state``: the
family state; ``conv_state``: the layer's window over the last tokens, the short convolutions' inputs
for Titans, the sliding-window attention's keys and values for LaCT, with its convolutions' windows
under ``use_short_conv``), take padding masks and ``cu_seqlens`` as ``TTTLayer`` does (unpad, run
packed, repad), and run the family's chunked form, or its decode step when every sequence of a call
has one token. PyTorch only: no Triton kernel yet.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ttt_mixer.layers.base import PackedMixerLayer, one_token_each
from ttt_mixer.layers.checks import (
    check_bool,
    check_heads_divide_width,
    check_int,
    check_positive_float,
)
from ttt_mixer.modules import DepthwiseCausalConv, apply_interleaved_rotary
from ttt_mixer.modules.sliding_window import WindowState, sliding_window_attention, token_positions
from ttt_mixer.ops import FamilySpec, family_ops, param_names, param_shapes
from ttt_mixer.ops.ttt.state import State

FAMILY_PRESETS = ("titans", "lact")
# LaCT's published language models: chunks and window of 2048 tokens, base learning rate 1e-3 through
# softplus; Titans' layer with chunks of 16 (their parallel training's) and a sigmoid gate
PRESET_DEFAULTS = {
    "titans": {"mini_batch_size": 16, "base_lr": 0.1},
    "lact": {"mini_batch_size": 2048, "base_lr": 1e-3, "window_size": 2048},
}
# forgetting starts near 0 (alpha = sigmoid(-5) ~ 0.007): an untrained layer keeps its memory
FORGET_BIAS_INIT = -5.0
L2_NORM_EPS = 1e-5


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """x / (||x|| + 1e-5) over the last dim, as LaCT writes it."""
    return x / (x.norm(dim=-1, keepdim=True) + L2_NORM_EPS)


def family_spec(preset: str, mini_batch_size: int, use_muon: bool = False) -> FamilySpec:
    """The FamilySpec of a preset."""
    if preset == "titans":
        return FamilySpec("mlp", "reconstruction", "dual", mini_batch_size, momentum=True, forgetting=True)
    return FamilySpec(
        "swiglu",
        "dot_product",
        "apply_then_update",
        mini_batch_size,
        momentum=True,
        weight_norm=True,
        muon=use_muon,
    )


def check_family_layer_options(options: dict[str, object], names: dict[str, str] | None = None) -> None:
    """Checks the family layers' constructor options; ``names`` maps an option to its caller's name."""
    names = names or {}
    preset = options.get("preset")
    if preset not in FAMILY_PRESETS:
        raise ValueError(f"{names.get('preset', 'preset')} must be one of {FAMILY_PRESETS}, got {preset!r}")
    if preset != "lact" and (options.get("window_size") is not None or options.get("use_muon")):
        # Titans has no attention branch and no Muon: the options would be silently ignored
        window, muon = names.get("window_size", "window_size"), names.get("use_muon", "use_muon")
        raise ValueError(f"{window} and {muon} belong to the preset 'lact', not {preset!r}")
    if preset != "lact" and options.get("use_short_conv"):
        # Titans always convolves its q, k, v
        name = names.get("use_short_conv", "use_short_conv")
        raise ValueError(f"{name} belongs to the preset 'lact' (Titans always has it), not {preset!r}")
    if preset != "titans" and options.get("memory_residual_norm"):
        # LaCT's fast weights have a dot-product loss, which has no LayerNorm to fuse
        name = names.get("memory_residual_norm", "memory_residual_norm")
        raise ValueError(f"{name} belongs to the preset 'titans', not {preset!r}")
    for option, value in options.items():
        name = names.get(option, option)
        if option in ("hidden_size", "num_heads", "conv_size") or (
            option in ("mini_batch_size", "window_size") and value is not None
        ):
            check_int(name, value)
        elif option in ("use_muon", "memory_residual_norm", "use_short_conv"):
            check_bool(name, value)
        elif option in ("rope_theta", "norm_eps") or (option == "base_lr" and value is not None):
            check_positive_float(name, value)
    check_heads_divide_width(options, names)


class TTTFamilyLayer(PackedMixerLayer):
    """A TTT-family mixer with a preset's projections around the family op: ``"titans"`` (Behrouz et
    al. 2025, the neural memory as a layer) or ``"lact"`` (Zhang et al. 2025, large-chunk TTT with
    SwiGLU fast weights beside sliding-window attention).

    Args:
        hidden_size, num_heads: width D and heads H (head dim d = D / H; LaCT's attention and fast
            weights both use H heads).
        preset: ``"titans"`` or ``"lact"``.
        mini_batch_size: tokens per update (None: 16 for Titans, 2048 for LaCT).
        base_lr: Titans: lr = base_lr * sigmoid(x W + c) (None: 0.1); LaCT: lr = softplus(x W + c +
            softplus^-1(base_lr)), one per fast-weight matrix (None: 1e-3).
        conv_size: width of the depthwise causal convolutions after the q, k, v projections (Titans',
            and LaCT's with ``use_short_conv``).
        window_size: LaCT's attention window (None: 2048 tokens, the token itself included).
        use_muon: LaCT's Newton-Schulz orthogonalised update.
        use_short_conv: LaCT's q, k, v each through a depthwise causal convolution before both
            branches (no activation of its own), as fla's layers with ``use_short_conv`` and Titans
            have: without it LaCT did not learn the recall gap's MQAR (docs/recall_gap.md, "LaCT
            with a short convolution").
        memory_residual_norm: Titans' memory as k + LN(MLP(k)) (TTT-MLP's form, and the public
            titans-pytorch's default), its LayerNorm fused into the reconstruction loss, instead of
            the bare MLP (docs/recall_gap.md, "Titans with the memory's residual and LayerNorm").
        rope_theta: RoPE base (LaCT's attention and fast-weight queries and keys).
        norm_eps: epsilon of the output RMSNorm.
        layer_idx: index of this layer's state in the cache.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        preset: str = "titans",
        mini_batch_size: int | None = None,
        base_lr: float | None = None,
        conv_size: int = 4,
        window_size: int | None = None,
        use_muon: bool = False,
        use_short_conv: bool = False,
        memory_residual_norm: bool = False,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        check_family_layer_options(
            {
                "preset": preset,
                "hidden_size": hidden_size,
                "num_heads": num_heads,
                "mini_batch_size": mini_batch_size,
                "base_lr": base_lr,
                "conv_size": conv_size,
                "window_size": window_size,
                "use_muon": use_muon,
                "use_short_conv": use_short_conv,
                "memory_residual_norm": memory_residual_norm,
                "rope_theta": rope_theta,
                "norm_eps": norm_eps,
            }
        )
        defaults = PRESET_DEFAULTS[preset]
        self.preset = preset
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.mini_batch_size = defaults["mini_batch_size"] if mini_batch_size is None else mini_batch_size
        self.base_lr = defaults["base_lr"] if base_lr is None else float(base_lr)
        self.spec = family_spec(preset, self.mini_batch_size, use_muon)
        self.window_size = defaults.get("window_size") if window_size is None else window_size
        self.use_short_conv = use_short_conv
        self.memory_residual_norm = memory_residual_norm
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.layer_idx = layer_idx
        H, d = num_heads, self.head_dim
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.momentum_proj = nn.Linear(hidden_size, H, bias=True)
        # one learning rate per head (Titans) or per head and fast-weight matrix (LaCT)
        self.lr_proj = nn.Linear(hidden_size, H * (3 if preset == "lact" else 1), bias=True)
        self.ttt_norm = nn.RMSNorm(d, eps=norm_eps)
        if preset == "titans" or use_short_conv:
            self.q_conv1d, self.k_conv1d, self.v_conv1d = (
                DepthwiseCausalConv(hidden_size, conv_size) for _ in range(3)
            )
        if preset == "titans":
            self.forget_proj = nn.Linear(hidden_size, H, bias=True)
            self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
            if memory_residual_norm:
                self.memory_norm_weight = nn.Parameter(torch.empty(H, d))
                self.memory_norm_bias = nn.Parameter(torch.empty(H, d))
        else:
            # LaCT's per-channel rescaling of the shared q, k for the fast weights, and its output scale
            self.qk_scale = nn.Parameter(torch.empty(2, hidden_size))
            self.qk_offset = nn.Parameter(torch.empty(2, hidden_size))
            self.ttt_scale_proj = nn.Linear(hidden_size, H, bias=True)
        for name, shape in zip(param_names(self.spec), param_shapes(self.spec, H, d), strict=True):
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The layer-specific parameters (projections are the model's): inner weights N(0, 1/d_in)
        (LaCT's), biases 0, Titans' forgetting bias at FORGET_BIAS_INIT, LaCT's q/k rescaling 1 and 0."""
        for name in param_names(self.spec):
            parameter = getattr(self, name)
            if parameter.dim() == 3:
                nn.init.normal_(parameter, std=1.0 / math.sqrt(parameter.shape[-2]))
            else:
                nn.init.zeros_(parameter)
        if self.preset == "titans":
            nn.init.constant_(self.forget_proj.bias, FORGET_BIAS_INIT)
            if self.memory_residual_norm:
                nn.init.ones_(self.memory_norm_weight)
                nn.init.zeros_(self.memory_norm_bias)
        else:
            nn.init.ones_(self.qk_scale)
            nn.init.zeros_(self.qk_offset)

    def inner_params(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in param_names(self.spec)]

    def extra_repr(self) -> str:
        return (
            f"preset={self.preset!r}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"mini_batch_size={self.mini_batch_size}, base_lr={self.base_lr}, window_size={self.window_size}, "
            f"use_short_conv={self.use_short_conv}, memory_residual_norm={self.memory_residual_norm}"
        )

    def mix(
        self,
        x: torch.Tensor,
        state: State | None,
        window: tuple | None,
        use_cache: bool,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, State | None, tuple | None]:
        """The preset's mixer on unpadded hidden states [B, T, D] -> (o [B, T, D], the family state,
        the layer's window)."""
        mix = self.titans_mix if self.preset == "titans" else self.lact_mix
        o, state, window = mix(x, state, window, use_cache, cu_seqlens)
        return self.o_proj(o), state, window

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def fast_weights(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lr: torch.Tensor,
        momentum: torch.Tensor,
        forget: torch.Tensor | None,
        state: State | None,
        use_cache: bool,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, State | None]:
        """The family op over [B, T, H, d] inputs: the decode step when every sequence has one token."""
        chunk_op, step_op = family_ops(self.spec, "torch")
        op = step_op if one_token_each(q, cu_seqlens) else chunk_op
        norm = (self.memory_norm_weight, self.memory_norm_bias) if self.memory_residual_norm else (None, None)
        return op(
            self.spec,
            q,
            k,
            v,
            lr,
            None,
            *norm,
            self.inner_params(),
            momentum=momentum,
            forget=forget,
            initial_state=state,
            output_final_state=use_cache,
            cu_seqlens=cu_seqlens,
        )

    def short_convs(
        self,
        projected: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        windows: tuple[torch.Tensor | None, ...] | None,
        use_cache: bool,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
        """q, k, v [B, T, D] through their depthwise causal convolutions, each continuing from its
        cached window; the new windows when ``use_cache``."""
        windows = windows if windows is not None else (None, None, None)
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        outputs = [
            conv(t, w, use_cache, cu_seqlens) for conv, t, w in zip(convs, projected, windows, strict=True)
        ]
        return [y for y, _ in outputs], tuple(w for _, w in outputs) if use_cache else None

    def titans_mix(
        self,
        x: torch.Tensor,
        state: State | None,
        windows: tuple[torch.Tensor, ...] | None,
        use_cache: bool,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, State | None, tuple | None]:
        """q, k, v through a depthwise causal convolution and SiLU, q and k l2-normalised; the memory's
        output RMS-normed and gated by silu(x W_g)."""
        convolved, windows = self.short_convs(
            (self.q_proj(x), self.k_proj(x), self.v_proj(x)), windows, use_cache, cu_seqlens
        )
        q, k, v = (self.heads(F.silu(t)) for t in convolved)
        lr = self.base_lr * torch.sigmoid(self.lr_proj(x))
        momentum, forget = torch.sigmoid(self.momentum_proj(x)), torch.sigmoid(self.forget_proj(x))
        o, state = self.fast_weights(
            l2_normalise(q), l2_normalise(k), v, lr, momentum, forget, state, use_cache, cu_seqlens
        )
        o = self.ttt_norm(o).flatten(-2) * F.silu(self.g_proj(x))
        return o, state, windows

    def lact_mix(
        self,
        x: torch.Tensor,
        state: State | None,
        conv_state: WindowState | tuple | None,
        use_cache: bool,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, State | None, tuple | None]:
        """Sliding-window attention on q, k, v with RoPE, plus the SwiGLU fast weights on SiLU'd,
        rescaled q, k (l2-normalised, RoPE'd) and v; the fast-weight output RMS-normed and scaled by
        silu(x W_s) per head, then added to the attention's. With ``use_short_conv``, q, k, v are
        first convolved and the cached state is (the window, the convolutions' windows)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        window = conv_state
        if self.use_short_conv:
            window, conv_windows = conv_state if conv_state is not None else (None, None)
            (q, k, v), conv_windows = self.short_convs((q, k, v), conv_windows, use_cache, cu_seqlens)
        positions = token_positions(window, x.shape[0], x.shape[1], cu_seqlens, x.device)
        rotated_q, rotated_k = (
            apply_interleaved_rotary(self.heads(t), positions, self.rope_theta) for t in (q, k)
        )
        attended, window = sliding_window_attention(
            rotated_q, rotated_k, self.heads(v), window, self.window_size, cu_seqlens
        )
        fast_q, fast_k = (
            l2_normalise(self.heads(F.silu(t * self.qk_scale[i] + self.qk_offset[i])))
            for i, t in enumerate((q, k))
        )
        fast_q, fast_k = (apply_interleaved_rotary(t, positions, self.rope_theta) for t in (fast_q, fast_k))
        inverse_softplus = math.log(math.expm1(self.base_lr))
        lr = F.softplus(self.lr_proj(x) + inverse_softplus).unflatten(-1, (self.num_heads, 3))
        momentum = torch.sigmoid(self.momentum_proj(x))
        o, state = self.fast_weights(
            fast_q, fast_k, self.heads(F.silu(v)), lr, momentum, None, state, use_cache, cu_seqlens
        )
        o = attended.flatten(-2) + (self.ttt_norm(o) * F.silu(self.ttt_scale_proj(x))[..., None]).flatten(-2)
        if not use_cache:
            return o, state, None
        return o, state, (window, conv_windows) if self.use_short_conv else window
