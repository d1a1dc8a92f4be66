"""The TTT sequence mixer as a flash-linear-attention layer.

Same constructor style, ``forward`` signature and return value as fla's layers (e.g. DeltaNet), its
recurrent state kept in fla's ``Cache`` through fla's helpers, padding masks and ``cu_seqlens``
handled the fla way (unpad, run packed, repad).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ttt_mixer.layers.base import PackedMixerLayer, one_token_each
from ttt_mixer.layers.checks import (
    check_backend,
    check_bool,
    check_heads_divide_width,
    check_int,
    check_positive_float,
    resolve_backend,
)
from ttt_mixer.modules import DepthwiseCausalConv, apply_interleaved_rotary
from ttt_mixer.ops import family_ops, param_shapes, state_position, ttt_spec
from ttt_mixer.ops.ttt.grid import minibatch_positions

DEFAULT_BASE_LR = {"linear": 1.0, "mlp": 0.1}


def check_layer_options(options: dict[str, object], names: dict[str, str] | None = None) -> None:
    """Checks TTTLayer's constructor options (a subset, by their TTTLayer names); ``names`` maps an
    option to the name its caller knows it by (TTTConfig's field names), for the messages."""
    names = names or {}
    for option, value in options.items():
        name = names.get(option, option)
        if option in ("hidden_size", "num_heads", "mini_batch_size", "conv_size") or (
            option == "head_dim" and value is not None
        ):
            check_int(name, value)
        elif option in ("share_qk", "use_gate", "use_rope"):
            check_bool(name, value)
        elif option in ("rope_theta", "norm_eps") or (option == "base_lr" and value is not None):
            check_positive_float(name, value)
    head_dim = options.get("head_dim")
    if head_dim is None:
        check_heads_divide_width(options, names)
        head_dim = options["hidden_size"] // options["num_heads"]
    if options.get("use_rope", True) and head_dim % 2:
        # RoPE rotates pairs of a head's dimensions
        raise ValueError(f"head_dim must be even with use_rope=True, got {head_dim}")


class TTTLayer(PackedMixerLayer):
    """Test-Time Training layer (Sun et al. 2024): TTT-Linear or TTT-MLP.

    Args:
        hidden_size: model width D.
        num_heads: heads H.
        head_dim: the head dim d; None takes D / H. As in fla's layers and transformers' attention,
            q, k and v project D to H * d and the output projection maps H * d back to D, so d need
            not be D / H (Mistral-Nemo: D = 5120, H = 32, d = 128).
        inner_model: ``"linear"`` (TTT-Linear) or ``"mlp"`` (TTT-MLP, hidden width 4d).
        mini_batch_size: TTT mini-batch size b.
        base_lr: eta_base of the learning-rate gate; None takes 1.0 (linear) or 0.1 (mlp).
        share_qk: the Mamba backbone's form: one projection for queries and keys,
            then two depthwise causal convolutions (with bias) give XQ and XK.
        conv_size: width of those convolutions.
        use_gate: output gate o = W_O(gelu_tanh(x W_G) * post_norm(z)).
        use_rope: RoPE on XQ and XK with position ``t mod b`` (the authors' layout); False omits it.
        rope_theta: RoPE base.
        norm_eps: epsilon of the inner LayerNorm and of the post-norm.
        layer_idx: index of this layer's state in the cache.
        backend: ``"torch"`` or ``"triton"``; None lets the TTT_MIXER_BACKEND environment variable
            choose, else Triton on CUDA tensors and PyTorch elsewhere. Triton on a CPU tensor needs
            Triton's interpreter (the TRITON_INTERPRET environment variable set to 1) and is an error
            without it.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        head_dim: int | None = None,
        inner_model: str = "linear",
        mini_batch_size: int = 16,
        base_lr: float | None = None,
        share_qk: bool = False,
        conv_size: int = 4,
        use_gate: bool = False,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        layer_idx: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_backend(backend)
        self.backend = backend
        check_layer_options(
            {
                "hidden_size": hidden_size,
                "num_heads": num_heads,
                "head_dim": head_dim,
                "mini_batch_size": mini_batch_size,
                "base_lr": base_lr,
                "share_qk": share_qk,
                "conv_size": conv_size,
                "use_gate": use_gate,
                "use_rope": use_rope,
                "rope_theta": rope_theta,
                "norm_eps": norm_eps,
            }
        )
        # TTT-Linear or TTT-MLP as a spec of the TTT family (ttt_mixer.ops)
        self.spec = ttt_spec(inner_model, mini_batch_size)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        # the width of q, k, v and of the output before o_proj (fla's name for H * d)
        self.key_dim = num_heads * self.head_dim
        self.mini_batch_size = mini_batch_size
        self.base_lr = DEFAULT_BASE_LR[inner_model] if base_lr is None else float(base_lr)
        self.share_qk = share_qk
        self.conv_size = conv_size
        self.use_gate = use_gate
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        if share_qk:
            self.q_conv1d = DepthwiseCausalConv(self.key_dim, conv_size)
            self.k_conv1d = DepthwiseCausalConv(self.key_dim, conv_size)
        else:
            self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.o_proj = nn.Linear(self.key_dim, hidden_size, bias=False)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        # the learning-rate gate x . w_h + c_h of every head at once
        self.lr_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.token_offset = nn.Parameter(torch.empty(mini_batch_size))
        self.ttt_norm_weight = nn.Parameter(torch.empty(num_heads, self.head_dim))
        self.ttt_norm_bias = nn.Parameter(torch.empty(num_heads, self.head_dim))
        # inner model weights w1 [H, d, d_hidden], b1 [H, d_hidden] (and w2, b2 for TTT-MLP)
        for i, (w_shape, b_shape) in enumerate(self.layer_shapes(), start=1):
            self.register_parameter(f"w{i}", nn.Parameter(torch.empty(w_shape)))
            self.register_parameter(f"b{i}", nn.Parameter(torch.empty(b_shape)))
        self.post_norm = nn.LayerNorm(self.key_dim, eps=norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The TTT-specific parameters, initialised as docs/math.md section 10 says (projections are the model's)."""
        nn.init.zeros_(self.token_offset)
        nn.init.ones_(self.ttt_norm_weight)
        nn.init.zeros_(self.ttt_norm_bias)
        for i in range(1, self.spec.num_matrices + 1):
            nn.init.normal_(getattr(self, f"w{i}"), mean=0.0, std=0.02)
            nn.init.zeros_(getattr(self, f"b{i}"))

    def layer_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(w [H, d_in, d_out], b [H, d_out]) of every inner layer."""
        shapes = param_shapes(self.spec, self.num_heads, self.head_dim)
        return list(zip(shapes[::2], shapes[1::2], strict=True))

    def inner_params(self) -> list[nn.Parameter]:
        """The inner model's initial weights in the ops' order: w1, b1[, w2, b2]."""
        return [
            getattr(self, f"{kind}{i}") for i in range(1, self.spec.num_matrices + 1) for kind in ("w", "b")
        ]

    def extra_repr(self) -> str:
        return (
            f"inner_model={self.spec.inner_model!r}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"mini_batch_size={self.mini_batch_size}, base_lr={self.base_lr}, use_rope={self.use_rope}"
        )

    def mix(
        self,
        hidden_states: torch.Tensor,
        recurrent_state: tuple[torch.Tensor, ...] | None,
        conv_state: tuple[torch.Tensor, torch.Tensor] | None,
        use_cache: bool,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple | None]:
        """The TTT mixer on unpadded hidden states [B, T, D] -> (o [B, T, D], the state, the
        convolutions' windows when ``share_qk``)."""
        conv_q, conv_k = conv_state if self.share_qk and conv_state is not None else (None, None)
        if self.share_qk:
            shared = self.q_proj(hidden_states)
            q, conv_q = self.q_conv1d(shared, conv_q, use_cache, cu_seqlens)
            k, conv_k = self.k_conv1d(shared, conv_k, use_cache, cu_seqlens)
        else:
            q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        q, k, v = (x.unflatten(-1, (self.num_heads, self.head_dim)) for x in (q, k, v))
        lr = self.base_lr / self.head_dim * torch.sigmoid(self.lr_proj(hidden_states))
        if self.use_rope:
            start = None if recurrent_state is None else state_position(recurrent_state)
            positions = minibatch_positions(
                q.shape[0], q.shape[1], cu_seqlens, start, self.mini_batch_size, device=q.device
            )
            q = apply_interleaved_rotary(q, positions, self.rope_theta)
            k = apply_interleaved_rotary(k, positions, self.rope_theta)

        chunk_op, step_op = family_ops(self.spec, resolve_backend(self.backend, q.device))
        o, recurrent_state = (step_op if one_token_each(q, cu_seqlens) else chunk_op)(
            self.spec,
            q,
            k,
            v,
            lr,
            self.token_offset,
            self.ttt_norm_weight,
            self.ttt_norm_bias,
            self.inner_params(),
            initial_state=recurrent_state,
            output_final_state=use_cache,
            cu_seqlens=cu_seqlens,
            eps=self.norm_eps,
        )
        o = self.post_norm(o.flatten(-2))
        if self.use_gate:
            o = F.gelu(self.g_proj(hidden_states), approximate="tanh") * o
        return self.o_proj(o), recurrent_state, (conv_q, conv_k) if self.share_qk else None


class TTTLinear(TTTLayer):
    """TTT-Linear: ``TTTLayer`` with a linear inner model."""

    def __init__(self, hidden_size: int = 1024, num_heads: int = 8, **kwargs) -> None:
        super().__init__(hidden_size=hidden_size, num_heads=num_heads, inner_model="linear", **kwargs)


class TTTMLP(TTTLayer):
    """TTT-MLP: ``TTTLayer`` with a two-layer MLP (hidden 4d, tanh-GELU) inner model."""

    def __init__(self, hidden_size: int = 1024, num_heads: int = 8, **kwargs) -> None:
        super().__init__(hidden_size=hidden_size, num_heads=num_heads, inner_model="mlp", **kwargs)
