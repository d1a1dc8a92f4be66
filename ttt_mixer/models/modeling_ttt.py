"""Hugging Face classes for TTT language models: ``TTTModel`` and ``TTTForCausalLM``.

Blocks (docs/math.md section 9): Transformer backbone x += TTT(RMSNorm(x)); x += SwiGLU(RMSNorm(x)); the
Mamba backbone adds a pre-convolution sublayer x += Conv(RMSNorm(x)) before TTT, shares the Q/K
projection (two short convolutions) and gates the TTT output. Padded batches are unpacked once at
the model's input (fla's unpad), so that padding reaches neither convolutions nor TTT states.
"""

from __future__ import annotations

import torch
from fla.layers.utils import (
    get_layer_cache,
    index_first_axis,
    repad_hidden_states,
    unpad_hidden_states,
    update_layer_cache,
)
from fla.models.utils import Cache
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from ttt_mixer.layers import TTTFamilyLayer, TTTLayer
from ttt_mixer.layers.checks import padding_mask
from ttt_mixer.models.causal_lm import (
    CausalLMGenerationMixin,
    RemoteCodeMixin,
    auto_classes,
    cache_argument,
    decoder_inputs,
    decoder_output,
)
from ttt_mixer.models.configuration_ttt import TTTConfig
from ttt_mixer.modules import DepthwiseCausalConv, SwiGLU


class PreConv(nn.Module):
    """The Mamba backbone's x += DepthwiseCausalConv(RMSNorm(x)) sublayer (returns the conv term).

    Its window is kept in the layer's cache entry under ``ffn_state``, the slot fla models use for
    block-level state outside the mixer (as RWKV-7 does for its token shift)."""

    def __init__(self, config: TTTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.conv = DepthwiseCausalConv(config.hidden_size, config.conv_kernel)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values: Cache | None,
        use_cache: bool,
        cu_seqlens: torch.Tensor | None,
    ) -> torch.Tensor:
        entry = get_layer_cache(self, past_key_values)
        state = entry["ffn_state"] if entry is not None else None
        out, state = self.conv(self.norm(hidden_states), state, use_cache, cu_seqlens)
        if use_cache:
            update_layer_cache(self, past_key_values, ffn_state=state, offset=0)
        return out


def mixer_layer(config: TTTConfig, layer_idx: int) -> TTTLayer | TTTFamilyLayer:
    """The block's sequence mixer: TTT-Linear / TTT-MLP, or the family member ``config.ttt_preset``."""
    shared_options = {
        "hidden_size": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "mini_batch_size": config.mini_batch_size,
        "base_lr": config.ttt_base_lr,
        "conv_size": config.conv_kernel,
        "rope_theta": config.rope_theta,
        "norm_eps": config.ttt_norm_eps,
        "layer_idx": layer_idx,
    }
    if config.ttt_preset is not None:
        return TTTFamilyLayer(
            preset=config.ttt_preset,
            window_size=config.window_size,
            use_muon=config.use_muon,
            use_short_conv=config.use_short_conv,
            memory_residual_norm=config.memory_residual_norm,
            **shared_options,
        )
    return TTTLayer(
        inner_model=config.ttt_layer_type,
        share_qk=config.share_qk,
        use_gate=config.use_gate,
        use_rope=config.use_rope,
        **shared_options,
    )


class TTTBlock(GradientCheckpointingLayer):
    def __init__(self, config: TTTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.pre_conv = PreConv(config, layer_idx) if config.pre_conv else None
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = mixer_layer(config, layer_idx)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        cache_offset: int | None = None,
    ) -> torch.Tensor:
        if self.pre_conv is not None:
            hidden_states = hidden_states + self.pre_conv(
                hidden_states, past_key_values, use_cache, cu_seqlens
            )
        mixed, _, _ = self.attn(
            self.attn_norm(hidden_states),
            past_key_values=past_key_values,
            use_cache=use_cache,
            cu_seqlens=cu_seqlens,
            cache_offset=cache_offset,
        )
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class TTTPreTrainedModel(RemoteCodeMixin, PreTrainedModel):
    remote_module = "ttt_mixer.models"
    remote_classes = auto_classes("TTT")
    config_class = TTTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TTTBlock"]
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()


class TTTModel(TTTPreTrainedModel):
    # what transformers' get_input_embeddings and set_input_embeddings read and write
    _input_embed_layer = "embeddings"

    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(TTTBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

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
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """``cache``: the fla Cache of earlier calls (``past_key_values`` is its older name);
        ``attention_mask``: 2-D padding mask over the cached and new tokens (a row may be all
        padding); ``cu_seqlens``: offsets of packed sequences (batch size 1) instead of a mask;
        ``position_ids``: restarts at 0 mark packed sequences as ``cu_seqlens`` does
        (transformers' ``DataCollatorWithFlattening``), else they must be the positions the mask and
        cache imply (TTT reads positions from its state). TTT has no attention weights:
        ``output_attentions=True`` gives None for each layer."""
        inputs_embeds, cache, use_cache, cu_seqlens = decoder_inputs(
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
        batch_size, q_len = inputs_embeds.shape[:2]
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if cache is not None and len(cache) > 0:
            cached = cache[0]["recurrent_state"]
            num_sequences = batch_size if cu_seqlens is None else cu_seqlens.numel() - 1
            if cached is not None and cached[0].shape[0] != num_sequences:
                raise ValueError(
                    f"the cache holds {cached[0].shape[0]} sequences but the input has {num_sequences}"
                )

        indices = None
        if padding_mask(attention_mask, batch_size, q_len) is not None:
            inputs_embeds, indices, cu_seqlens = unpad_hidden_states(
                inputs_embeds, None, attention_mask, q_len
            )

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                padded = repad_hidden_states(hidden_states, indices, batch_size, q_len)
                all_hidden_states += (padded,)
                if indices is not None:
                    # read the layer's input back from the padded copy, so that the returned
                    # hidden state is the one in the graph (its gradient is the layer's)
                    hidden_states = index_first_axis(padded.flatten(0, 1), indices).unsqueeze(0)
            hidden_states = layer(hidden_states, cache, use_cache, cu_seqlens, cache_offset=q_len)
        hidden_states = repad_hidden_states(self.norm(hidden_states), indices, batch_size, q_len)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        all_attentions = (None,) * len(self.layers) if output_attentions else None
        return decoder_output(
            self, hidden_states, cache, use_cache, all_hidden_states, all_attentions, return_dict
        )


class TTTForCausalLM(CausalLMGenerationMixin, TTTPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}
    decoder_class = TTTModel
