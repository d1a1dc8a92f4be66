"""Hugging Face classes for TTT-E2E (Tandon et al. 2025, *End-to-End Test-Time Training for Long
Context*): ``E2EModel`` and ``E2EForCausalLM``. The math, and which weights produce which logits, is
in docs/math.md section 16.

A Transformer with sliding-window attention (RoPE, QK-norm, pre- and post-norm); each of the last
``suffix_len`` blocks has a second SwiGLU MLP, ``feed_forward_prime``, whose weights are the inner
model. The suffix runs mini-batch by mini-batch: a mini-batch's outputs come from the current inner
weights, then one clipped SGD step on its next-token loss (its last target is the next mini-batch's
first token) gives the weights of the next mini-batch. Outer training differentiates through the
steps. The forward works in rows: each sequence's real tokens left-aligned, so that padding reaches
neither attention nor the inner loss.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from fla.models.utils import Cache
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from ttt_mixer.e2e.configuration_e2e import E2EConfig
from ttt_mixer.layers.checks import padding_mask
from ttt_mixer.models.causal_lm import (
    CausalLMGenerationMixin,
    RemoteCodeMixin,
    auto_classes,
    cache_argument,
    decoder_inputs,
    decoder_output,
)
from ttt_mixer.modules import SwiGLU, apply_interleaved_rotary
from ttt_mixer.modules.sliding_window import (
    WindowState,
    empty_window,
    sliding_window_attention,
    token_positions,
)

# the inner model of one suffix block, per sequence: gate [N, I, D], up [N, I, D], down [N, D, I]
InnerWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def batched_swiglu(x: torch.Tensor, weights: InnerWeights) -> torch.Tensor:
    """``SwiGLU`` with one set of weights per sequence: x [N, L, D] -> [N, L, D]."""
    gate, up, down = weights
    return (F.silu(x @ gate.mT) * (x @ up.mT)) @ down.mT


def norm_or_identity(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def clipped_sgd_step(
    weights: list[torch.Tensor], grads: tuple[torch.Tensor, ...], lr: float, max_norm: float
) -> list[torch.Tensor]:
    """One SGD step per sequence (axis 0), each sequence's gradient clipped to global norm
    ``max_norm`` over all ``weights`` (0: no clipping): optax's ``clip_by_global_norm`` then ``sgd``
    as the authors chain them, g -> g if |g| < max_norm else g / |g| * max_norm."""
    if max_norm > 0:
        squares = sum(g.flatten(1).square().sum(1) for g in grads)
        # clamped so that a zero gradient (a row without an update) has a finite derivative
        norm = squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt()
        within = norm < max_norm
        grads = tuple(
            torch.where(within.view(shape), g, g / norm.view(shape) * max_norm)
            for g in grads
            for shape in [(-1, *([1] * (g.dim() - 1)))]
        )
    return [w - lr * g for w, g in zip(weights, grads, strict=True)]


class E2EAttention(nn.Module):
    """Sliding-window attention with QK-norm (RMSNorm per head, shared by the heads) and interleaved
    RoPE at each token's absolute position; its keys and values live in a ``WindowState``."""

    def __init__(self, config: E2EConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.window_size = config.sliding_window_size
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, window: WindowState | None
    ) -> tuple[torch.Tensor, WindowState]:
        """x [N, L, D] rows, ``valid`` [N, L] their real tokens (a prefix of each row)."""
        rows, length = x.shape[:2]
        heads = (rows, length, self.num_heads, self.head_dim)
        q = norm_or_identity(self.q_norm, self.q_proj(x).view(heads))
        k = norm_or_identity(self.k_norm, self.k_proj(x).view(heads))
        positions = token_positions(window, rows, length, None, x.device)
        q = apply_interleaved_rotary(q, positions, self.rope_theta)
        k = apply_interleaved_rotary(k, positions, self.rope_theta)
        out, window = sliding_window_attention(
            q, k, self.v_proj(x).view(heads), window, self.window_size, valid=valid
        )
        return self.o_proj(out.flatten(2)), window


class E2EBlock(nn.Module):
    """x += PostNorm(Attention(PreNorm(x))); in suffix blocks x += PostNorm(InnerMLP(PreNorm(x)));
    x += PostNorm(SwiGLU(PreNorm(x))). Each norm exists only when its flag is set."""

    def __init__(self, config: E2EConfig, is_suffix: bool) -> None:
        super().__init__()

        def norm(flag: bool) -> nn.RMSNorm | None:
            return nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if flag else None

        self.attn_norm = norm(config.pre_norm)
        self.attn = E2EAttention(config)
        self.attn_post_norm = norm(config.post_norm)
        if is_suffix:
            self.feed_forward_prime_norm = norm(config.pre_norm)
            self.feed_forward_prime = SwiGLU(config.hidden_size, config.intermediate_size)
            self.feed_forward_prime_post_norm = norm(config.post_norm)
        else:
            self.feed_forward_prime = None
        self.mlp_norm = norm(config.pre_norm)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.mlp_post_norm = norm(config.post_norm)

    def inner_weights(self, rows: int) -> InnerWeights:
        """The inner model's initial weights (the outer parameters) for ``rows`` sequences."""
        mlp = self.feed_forward_prime
        return tuple(
            linear.weight.expand(rows, *linear.weight.shape)
            for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        )

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        window: WindowState | None,
        inner: InnerWeights | None = None,
    ) -> tuple[torch.Tensor, WindowState]:
        """x [N, L, D] rows; ``inner``: the suffix block's current inner weights."""
        mixed, window = self.attn(norm_or_identity(self.attn_norm, x), valid, window)
        x = x + norm_or_identity(self.attn_post_norm, mixed)
        if self.feed_forward_prime is not None:
            prime = batched_swiglu(norm_or_identity(self.feed_forward_prime_norm, x), inner)
            x = x + norm_or_identity(self.feed_forward_prime_post_norm, prime)
        x = x + norm_or_identity(self.mlp_post_norm, self.mlp(norm_or_identity(self.mlp_norm, x)))
        return x, window


def left_aligned(valid: torch.Tensor) -> torch.Tensor:
    """The permutation [N, L] that moves each row's real tokens (``valid``) to its front, in order."""
    return torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices


def gather_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x [N, L, ...] reordered along axis 1 by ``order`` [N, L'] (indices into L)."""
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
    return x.gather(1, index)


def scatter_rows(x: torch.Tensor, order: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of ``gather_rows``: x [N, L', ...] put back at positions ``order`` of rows of
    ``length``, zeros elsewhere."""
    out = x.new_zeros(x.shape[0], length, *x.shape[2:])
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return out.scatter(1, index, x)


class E2EPreTrainedModel(RemoteCodeMixin, PreTrainedModel):
    remote_module = "ttt_mixer.e2e"
    remote_classes = auto_classes("E2E")
    config_class = E2EConfig
    base_model_prefix = "model"
    _no_split_modules = ["E2EBlock"]
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()


class E2EModel(E2EPreTrainedModel):
    """The decoder. Its cache (an fla ``Cache``), per layer under ``recurrent_state``: the window of
    keys and values (``WindowState``), and for a suffix block its inner weights after it; the last
    layer's ``ffn_state`` holds the tokens of each sequence's current mini-batch, whose update waits
    for the token after it: their suffix inputs [N, P, D], ids [N, P] and count [N]. The suffix
    windows hold only tokens of mini-batches already learned from, as the inner weights do."""

    _input_embed_layer = "embeddings"

    def __init__(self, config: E2EConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        first_suffix = config.num_hidden_layers - config.suffix_len
        self.layers = nn.ModuleList(
            E2EBlock(config, is_suffix=i >= first_suffix) for i in range(config.num_hidden_layers)
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    @property
    def prefix_layers(self) -> list[E2EBlock]:
        return list(self.layers[: self.config.num_hidden_layers - self.config.suffix_len])

    @property
    def suffix_layers(self) -> list[E2EBlock]:
        return list(self.layers[self.config.num_hidden_layers - self.config.suffix_len :])

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        lm_head: nn.Module | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """``cache``: the fla Cache of earlier calls (``past_key_values`` is its older name);
        ``attention_mask``: 2-D padding mask over the cached and new tokens (any padding: each row's
        real tokens are read in order); ``position_ids`` are checked, positions come from the cache;
        ``lm_head``: the head of the inner loss (``E2EForCausalLM`` passes its own; by default the
        tied embeddings). Packed sequences (``cu_seqlens``), ``inputs_embeds`` with an inner loop
        (it needs the token ids as targets), ``output_hidden_states`` and ``torch.inference_mode``
        (the inner loop takes gradients) are refused."""
        if output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states:
            raise ValueError("output_hidden_states is not supported by TTT-E2E models")
        if torch.is_inference_mode_enabled() and self.config.suffix_len:
            raise RuntimeError(
                "TTT-E2E's inner loop takes gradients at test time: call it under torch.no_grad(), "
                "not torch.inference_mode()"
            )
        if inputs_embeds is not None and self.config.suffix_len:
            raise ValueError(
                "TTT-E2E's inner loop needs the token ids as targets: give input_ids, not inputs_embeds"
            )
        head_weight = self.inner_loss_head(lm_head)
        embeds, cache, use_cache, cu_seqlens = decoder_inputs(
            self,
            input_ids,
            attention_mask,
            inputs_embeds,
            cache_argument(cache, past_key_values),
            use_cache,
            attention_layers=[False] * len(self.layers),
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
        )
        if cu_seqlens is not None:
            raise ValueError(
                "TTT-E2E takes no packed sequences (cu_seqlens, or position_ids restarting at 0): "
                "give one sequence per row, with an attention_mask for padding"
            )
        batch_size, q_len = embeds.shape[:2]
        states = (
            [cache[i]["recurrent_state"] for i in range(len(cache))]
            if cache is not None and len(cache)
            else None
        )
        if states is not None and states[0][3].shape[0] != batch_size:
            raise ValueError(
                f"the cache holds {states[0][3].shape[0]} sequences but the input has {batch_size}"
            )
        mask = padding_mask(attention_mask, batch_size, q_len)
        valid = (
            torch.ones(batch_size, q_len, dtype=torch.bool, device=embeds.device) if mask is None else mask
        )
        order = left_aligned(valid)
        x, valid_rows = gather_rows(embeds, order), gather_rows(valid, order)
        ids = None if input_ids is None else gather_rows(input_ids, order)

        new_states = []
        for i, layer in enumerate(self.prefix_layers):
            x, window = layer(x, valid_rows, None if states is None else states[i])
            new_states.append(window)
        if self.config.suffix_len:
            pending = None if cache is None or not len(cache) else cache[len(self.layers) - 1]["ffn_state"]
            x, suffix_states, pending = self.suffix_forward(
                x,
                valid_rows,
                ids,
                head_weight,
                None if states is None else states[len(new_states) :],
                pending,
            )
            new_states.extend(suffix_states)
        else:
            x = self.norm(x)
            pending = None
        hidden_states = scatter_rows(x, order, q_len)
        if use_cache:
            for i, state in enumerate(new_states):
                is_last = i == len(new_states) - 1
                cache.update(
                    recurrent_state=state,
                    ffn_state=pending if is_last else None,
                    layer_idx=i,
                    offset=q_len,
                )
        all_attentions = (None,) * len(self.layers) if output_attentions else None
        return decoder_output(self, hidden_states, cache, use_cache, None, all_attentions, return_dict)

    def inner_loss_head(self, lm_head: nn.Module | None) -> torch.Tensor | None:
        """The weight [V, D] of the head the inner loss reads logits through."""
        if not self.config.suffix_len:
            return None
        if lm_head is not None:
            return lm_head.weight
        if self.config.tie_word_embeddings:
            return self.embeddings.weight
        raise ValueError(
            "E2EModel's inner loop needs the LM head, which an untied model keeps in E2EForCausalLM: "
            "call E2EForCausalLM, or pass lm_head="
        )

    def inner_step(
        self,
        h: torch.Tensor,
        head_weight: torch.Tensor,
        targets: torch.Tensor,
        targets_valid: torch.Tensor,
        learns: torch.Tensor,
        current: list[torch.Tensor],
        create_graph: bool,
    ) -> list[torch.Tensor]:
        """The inner weights after one mini-batch: a clipped SGD step on each learning row's mean
        next-token loss of its outputs ``h`` [N, b, D] (the normed final hidden states); other rows
        keep ``current``."""
        logits = F.linear(h, head_weight)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(
            targets.shape
        )
        mask = targets_valid.to(token_loss.dtype)
        row_loss = (token_loss * mask).sum(1) / mask.sum(1).clamp_min(1e-10)
        loss = (row_loss * learns.to(row_loss.dtype)).sum()
        grads = torch.autograd.grad(loss, current, create_graph=create_graph)
        stepped = clipped_sgd_step(current, grads, self.config.inner_lr, self.config.inner_clip_gradient)
        return [
            torch.where(learns.view(-1, 1, 1), new.to(old.dtype), old)
            for new, old in zip(stepped, current, strict=True)
        ]

    def suffix_forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        ids: torch.Tensor,
        head_weight: torch.Tensor,
        states: list[tuple] | None,
        pending: tuple | None,
    ) -> tuple[torch.Tensor, list[tuple], tuple]:
        """The suffix blocks and the inner loop over rows x [N, L, D] (real tokens ``valid``, ids
        ``ids``), continuing the ``pending`` tokens of the current mini-batch. Returns the final
        hidden states of the L tokens (normed), each suffix block's state and the new pending
        tokens."""
        rows, _, width = x.shape
        size = self.config.mini_batch_size
        suffix = self.suffix_layers
        if states is None:
            attn = suffix[0].attn
            like = x.new_zeros(()).to(torch.promote_types(x.dtype, torch.float32))
            windows = [
                empty_window(rows, attn.window_size, attn.num_heads, attn.head_dim, like) for _ in suffix
            ]
            inner = [w for layer in suffix for w in layer.inner_weights(rows)]
        else:
            windows = [state[:4] for state in states]
            inner = [w for state in states for w in state[4:]]
        if pending is None:
            pending = (x.new_zeros(rows, 0, width), ids.new_zeros(rows, 0), ids.new_zeros(rows))
        pending_x, pending_ids, pending_count = pending
        # each row: its pending tokens, then its new ones, left-aligned; a row starts at a mini-batch
        pending_valid = torch.arange(pending_x.shape[1], device=x.device)[None, :] < pending_count[:, None]
        order = left_aligned(torch.cat([pending_valid, valid], dim=1))
        all_x = gather_rows(torch.cat([pending_x.to(x.dtype), x], dim=1), order)
        all_valid = gather_rows(torch.cat([pending_valid, valid], dim=1), order)
        all_ids = gather_rows(torch.cat([pending_ids, ids], dim=1), order)
        total = all_x.shape[1]
        chunks = -(-total // size)
        pad = chunks * size + 1 - total
        all_x, all_valid, all_ids = (
            torch.cat([t, t.new_zeros(rows, pad, *t.shape[2:])], dim=1) for t in (all_x, all_valid, all_ids)
        )
        row_length = all_valid.sum(1)
        # the outer gradient runs through the inner steps when there is one to take (frozen weights or
        # a cached state have none: their inner steps are taken on detached copies)
        create_graph = torch.is_grad_enabled() and any(w.requires_grad for w in inner)
        targets_valid = all_valid[:, 1:]
        if self.config.bos_token_id is not None:
            # the authors' loss mask: no loss on a target that is BOS (a document start)
            targets_valid = targets_valid & (all_ids[:, 1:] != self.config.bos_token_id)
        steps = self.config.inner_lr > 0
        outputs = []
        for c in range(chunks):
            span = slice(c * size, (c + 1) * size)
            # a row learns from this mini-batch when it is full and the token after it is known
            learns = row_length >= (c + 1) * size + 1
            # the inner step takes gradients, also under no_grad; the outer gradient differentiates
            # them, which only SDPA's math backend can (a double backward)
            with (
                torch.enable_grad() if steps else nullcontext(),
                sdpa_kernel(SDPBackend.MATH) if create_graph and steps else nullcontext(),
            ):
                current = inner if create_graph or not steps else [w.detach().requires_grad_() for w in inner]
                h, chunk_windows = all_x[:, span], []
                for j, layer in enumerate(suffix):
                    h, window = layer(h, all_valid[:, span], windows[j], tuple(current[3 * j : 3 * j + 3]))
                    chunk_windows.append(window)
                h = self.norm(h)
                if bool(learns.any()):
                    if steps:
                        targets = all_ids[:, span.start + 1 : span.stop + 1]
                        inner = self.inner_step(
                            h, head_weight, targets, targets_valid[:, span], learns, current, create_graph
                        )
                    windows = [
                        tuple(
                            torch.where(learns.view(-1, *[1] * (n.dim() - 1)), n, o)
                            for n, o in zip(new, old, strict=True)
                        )
                        for new, old in zip(chunk_windows, windows, strict=True)
                    ]
            if not create_graph:
                h = h.detach()
                inner = [w.detach() for w in inner]
                windows = [tuple(t.detach() for t in w) for w in windows]
            outputs.append(h)
        out = torch.cat(outputs, dim=1)
        # the new tokens' outputs, back in their input rows
        new_at = torch.argsort(order, dim=1)[:, pending_x.shape[1] :]
        hidden = gather_rows(out, new_at)
        learned = torch.div(row_length - 1, size, rounding_mode="floor").clamp_min(0) * size
        count = row_length - learned
        keep = int(count.max())
        at = (learned[:, None] + torch.arange(keep, device=x.device)[None, :]).clamp_max(all_x.shape[1] - 1)
        new_pending = (gather_rows(all_x, at).detach(), gather_rows(all_ids, at), count)
        states = [tuple(windows[j]) + tuple(inner[3 * j : 3 * j + 3]) for j in range(len(suffix))]
        return hidden, states, new_pending


class E2EForCausalLM(CausalLMGenerationMixin, E2EPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}
    decoder_class = E2EModel

    def decoder_inputs(self) -> dict[str, object]:
        """The LM head, which the decoder's inner loss reads."""
        return {"lm_head": self.lm_head}
