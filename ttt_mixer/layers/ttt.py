"""The TTT sequence mixer as a flash-linear-attention layer.

Same constructor style, ``forward`` signature and return value as fla's layers (e.g. DeltaNet), its
recurrent state kept in fla's ``Cache`` through fla's helpers, padding masks and ``cu_seqlens``
handled the fla way (unpad, run packed, repad).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache
from fla.models.utils import Cache
from torch import nn

from ttt_mixer.layers.checks import (
    check_backend,
    check_bool,
    check_cache_batch,
    check_hidden_states,
    check_int,
    check_positive_float,
    padding_mask,
    resolve_backend,
)
from ttt_mixer.modules import DepthwiseCausalConv, apply_interleaved_rotary
from ttt_mixer.ops import state_position, ttt_chunk, ttt_chunk_triton, ttt_step, ttt_step_triton
from ttt_mixer.ops.ttt.grid import minibatch_positions
from ttt_mixer.ops.ttt.inner import get_inner_model

DEFAULT_BASE_LR = {"linear": 1.0, "mlp": 0.1}
# backend -> (whole-sequence op, decode-step op)
BACKENDS = {"torch": (ttt_chunk, ttt_step), "triton": (ttt_chunk_triton, ttt_step_triton)}


def check_layer_options(options: dict[str, object], names: dict[str, str] | None = None) -> None:
    """Checks TTTLayer's constructor options (a subset, by their TTTLayer names); ``names`` maps an
    option to the name its caller knows it by (TTTConfig's field names), for the messages."""
    names = names or {}
    for option, value in options.items():
        name = names.get(option, option)
        if option in ("hidden_size", "num_heads", "mini_batch_size", "conv_size"):
            check_int(name, value)
        elif option in ("share_qk", "use_gate", "use_rope"):
            check_bool(name, value)
        elif option in ("rope_theta", "norm_eps") or (option == "base_lr" and value is not None):
            check_positive_float(name, value)
    if options["hidden_size"] % options["num_heads"]:
        raise ValueError(
            f"{names.get('hidden_size', 'hidden_size')} ({options['hidden_size']}) must be divisible by "
            f"{names.get('num_heads', 'num_heads')} ({options['num_heads']})"
        )


class TTTLayer(nn.Module):
    """Test-Time Training layer (Sun et al. 2024): TTT-Linear or TTT-MLP.

    Args:
        hidden_size: model width D.
        num_heads: heads H; the head dim d = D / H.
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
        self.inner = get_inner_model(inner_model)
        check_backend(backend)
        self.backend = backend
        check_layer_options(
            {
                "hidden_size": hidden_size,
                "num_heads": num_heads,
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
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.mini_batch_size = mini_batch_size
        self.base_lr = DEFAULT_BASE_LR[inner_model] if base_lr is None else float(base_lr)
        self.share_qk = share_qk
        self.conv_size = conv_size
        self.use_gate = use_gate
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if share_qk:
            self.q_conv1d = DepthwiseCausalConv(hidden_size, conv_size)
            self.k_conv1d = DepthwiseCausalConv(hidden_size, conv_size)
        else:
            self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        # the learning-rate gate x . w_h + c_h of every head at once
        self.lr_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.token_offset = nn.Parameter(torch.empty(mini_batch_size))
        self.ttt_norm_weight = nn.Parameter(torch.empty(num_heads, self.head_dim))
        self.ttt_norm_bias = nn.Parameter(torch.empty(num_heads, self.head_dim))
        # inner model weights w1 [H, d, d_hidden], b1 [H, d_hidden] (and w2, b2 for TTT-MLP)
        for i, (d_in, d_out) in enumerate(self.inner.layer_shapes(self.head_dim), start=1):
            self.register_parameter(f"w{i}", nn.Parameter(torch.empty(num_heads, d_in, d_out)))
            self.register_parameter(f"b{i}", nn.Parameter(torch.empty(num_heads, d_out)))
        self.post_norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The TTT-specific parameters, initialised as docs/math.md section 10 says (projections are the model's)."""
        nn.init.zeros_(self.token_offset)
        nn.init.ones_(self.ttt_norm_weight)
        nn.init.zeros_(self.ttt_norm_bias)
        for i in range(1, self.inner.num_layers + 1):
            nn.init.normal_(getattr(self, f"w{i}"), mean=0.0, std=0.02)
            nn.init.zeros_(getattr(self, f"b{i}"))

    def inner_params(self) -> list[nn.Parameter]:
        """The inner model's initial weights in the ops' order: w1, b1[, w2, b2]."""
        return [
            getattr(self, f"{kind}{i}") for i in range(1, self.inner.num_layers + 1) for kind in ("w", "b")
        ]

    def extra_repr(self) -> str:
        return (
            f"inner_model={self.inner.name!r}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"mini_batch_size={self.mini_batch_size}, base_lr={self.base_lr}, use_rope={self.use_rope}"
        )

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
        if attention_mask is not None and kwargs.get("cu_seqlens") is not None:
            raise ValueError("give either cu_seqlens (packed input) or a padding attention_mask, not both")

        last_state = get_layer_cache(self, past_key_values)
        hidden_states, indices, cu_seqlens = unpad_hidden_states(
            hidden_states, kwargs.get("cu_seqlens"), attention_mask, q_len
        )
        num_sequences = batch_size if cu_seqlens is None else cu_seqlens.numel() - 1
        # the entry may exist without our states: a block-level sublayer can write it first
        recurrent_state = last_state["recurrent_state"] if last_state is not None else None
        conv_state = last_state["conv_state"] if last_state is not None else None
        conv_q, conv_k = conv_state if self.share_qk and conv_state is not None else (None, None)
        if recurrent_state is not None:
            check_cache_batch(type(self).__name__, state_position(recurrent_state).shape[0], num_sequences)

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

        one_token_each = q.shape[1] == 1 if cu_seqlens is None else bool((cu_seqlens.diff() <= 1).all())
        chunk_op, step_op = BACKENDS[resolve_backend(self.backend, q.device)]
        o, recurrent_state = (step_op if one_token_each else chunk_op)(
            self.inner.name,
            q,
            k,
            v,
            lr,
            self.token_offset,
            self.ttt_norm_weight,
            self.ttt_norm_bias,
            self.inner_params(),
            initial_state=recurrent_state,
            output_final_state=bool(use_cache),
            cu_seqlens=cu_seqlens,
            eps=self.norm_eps,
        )
        update_layer_cache(
            self,
            past_key_values,
            recurrent_state=recurrent_state,
            conv_state=(conv_q, conv_k) if self.share_qk else None,
            offset=q_len if kwargs.get("cache_offset") is None else kwargs["cache_offset"],
        )

        o = self.post_norm(o.flatten(-2))
        if self.use_gate:
            o = F.gelu(self.g_proj(hidden_states), approximate="tanh") * o
        o = self.o_proj(o)
        return repad_hidden_states(o, indices, batch_size, q_len), None, past_key_values


class TTTLinear(TTTLayer):
    """TTT-Linear: ``TTTLayer`` with a linear inner model."""

    def __init__(self, hidden_size: int = 1024, num_heads: int = 8, **kwargs) -> None:
        super().__init__(hidden_size=hidden_size, num_heads=num_heads, inner_model="linear", **kwargs)


class TTTMLP(TTTLayer):
    """TTT-MLP: ``TTTLayer`` with a two-layer MLP (hidden 4d, tanh-GELU) inner model."""

    def __init__(self, hidden_size: int = 1024, num_heads: int = 8, **kwargs) -> None:
        super().__init__(hidden_size=hidden_size, num_heads=num_heads, inner_model="mlp", **kwargs)
