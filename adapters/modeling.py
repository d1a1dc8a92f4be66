"""Llama, Mamba and Mamba-2 backbones whose layers each hold a chosen sequence mixer.

Parameter names follow transformers' ``LlamaForCausalLM``, ``MambaForCausalLM`` and
``Mamba2ForCausalLM``, so a layer left as it was keeps its checkpoint keys. Every mixer follows fla's layer interface and keeps its state in
one fla ``Cache``: attention its keys and values, TTT and the linear mixers their recurrent state,
Mamba its convolution and SSM states; fla's generation mixin carries that cache through ``generate``.
Padding reaches each mixer as the 2-D mask, which every mixer honours exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from fla.models.utils import Cache
from torch import nn
from transformers import LlamaPreTrainedModel, MambaPreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.mamba.modeling_mamba import MambaRMSNorm

from ttt_mixer.adapters.configuration import MixerLlamaConfig, MixerMamba2Config, MixerMambaConfig
from ttt_mixer.adapters.mixers import build_mixer
from ttt_mixer.models.causal_lm import (
    CausalLMGenerationMixin,
    RemoteCodeMixin,
    auto_classes,
    cache_argument,
    decoder_inputs,
    decoder_output,
)
from ttt_mixer.models.packing import PackedAsPadded


def layer_mixer(
    config: MixerLlamaConfig | MixerMambaConfig | MixerMamba2Config, layer_idx: int, num_heads: int
) -> nn.Module:
    name = config.mixers[layer_idx]
    options = dict(config.mixer_options.get(name, {}))
    num_heads = options.pop("num_heads", num_heads)
    return build_mixer(name, config.hidden_size, num_heads, layer_idx, config, **options)


class MixerPreTrainedMixin(RemoteCodeMixin):
    """Weight init and saving shared by the backbones: the backbone's init for its own modules, then
    each mixer's own (``reset_parameters``)."""

    remote_module = "ttt_mixer.adapters"
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        """The backbone's init, then, as fla's models do, ``reset_parameters`` of every module that
        has one other than torch's Linear, convolution and embedding (whose reset is PyTorch's default
        draw, which the backbone's init replaces). transformers initialises a module's children
        before it, so each mixer resets what it initialises specially (a constant bias, a skip D, a
        structured A or dt, its own draws) after the backbone initialised its projections, and starts
        as it does alone; transformers' Mamba and Mamba-2 mixers reset as transformers' own models
        initialise them (``init_as_transformers``)."""
        super()._init_weights(module)
        if hasattr(module, "reset_parameters") and not isinstance(
            module, (nn.Linear, nn.Conv1d, nn.Embedding)
        ):
            module.reset_parameters()


class MixerDecoderMixin:
    """Embeddings -> mixer blocks -> final norm, with one fla ``Cache`` for every layer. The backbone
    names its embedding and final norm as its checkpoints do (``_input_embed_layer``, which
    transformers' get_input_embeddings and set_input_embeddings read, and ``final_norm_layer``)."""

    final_norm_layer: str

    def build_decoder(self, block_class: type[nn.Module], final_norm: nn.Module) -> None:
        """After the embedding: a ``block_class(config, layer_idx)`` per layer, then ``final_norm``;
        gradient checkpointing off, then transformers' ``post_init``."""
        num_layers = self.config.num_hidden_layers
        self.layers = nn.ModuleList(block_class(self.config, i) for i in range(num_layers))
        setattr(self, self.final_norm_layer, final_norm)
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
        position_ids: torch.LongTensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """``cache``: the fla Cache of earlier calls (``past_key_values`` is its older name);
        ``attention_mask``: 2-D padding mask over the cached and new tokens (a row may be all
        padding); ``position_ids`` (optional) reach the attention layers, the recurrent mixers take
        positions from their state; restarts to 0 in them mark packed sequences (transformers'
        ``DataCollatorWithFlattening``), as ``cu_seqlens`` [N + 1] (batch size 1) does. Packed
        sequences run as a left-padded batch of one row each (every mixer skips padding exactly) and
        leave no cache. ``output_attentions=True``: attention layers give their weights [B, H, T, L]
        (of that padded batch when packed), the other mixers None."""
        given_cache = cache_argument(cache, past_key_values)
        inputs_embeds, cache, use_cache_as_set, cu_seqlens = decoder_inputs(
            self,
            input_ids,
            attention_mask,
            inputs_embeds,
            given_cache,
            use_cache,
            attention_layers=[mixer == "attention" for mixer in self.config.mixers],
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
        )
        packing = None
        if cu_seqlens is not None:
            if use_cache or given_cache is not None:
                raise ValueError(
                    "packed sequences (cu_seqlens, or position_ids that restart at 0) run without a cache "
                    "in this model: its attention layers would keep them as a padded batch; pass "
                    "use_cache=False and no cache, or a padded batch with its attention_mask"
                )
            # use_cache left unset: the model's default does not apply to packed sequences
            cache, use_cache_as_set = None, False
            packing = PackedAsPadded(cu_seqlens)
            # the padded batch's mask gives each sequence its positions from 0
            attention_mask, position_ids = packing.attention_mask, None
            inputs_embeds = packing.pad(inputs_embeds)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states if packing is None else packing.unpack(hidden_states),)
            hidden_states, attentions = layer(
                hidden_states,
                attention_mask=attention_mask,
                past_key_values=cache,
                use_cache=use_cache_as_set,
                output_attentions=bool(output_attentions),
                position_ids=position_ids,
            )
            if output_attentions:
                all_attentions += (attentions,)
        if packing is not None:
            hidden_states = packing.unpack(hidden_states)
        hidden_states = getattr(self, self.final_norm_layer)(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return decoder_output(
            self, hidden_states, cache, use_cache_as_set, all_hidden_states, all_attentions, return_dict
        )


def mix(mixer: nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """(output, attention weights or None) of one mixer call."""
    output, attentions, _ = mixer(hidden_states, **kwargs)
    return output, attentions


class MixerLlamaDecoderLayer(GradientCheckpointingLayer):
    """Llama's decoder layer, x += mixer(RMSNorm(x)); x += MLP(RMSNorm(x)), with any mixer as
    ``self_attn``."""

    def __init__(self, config: MixerLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = layer_mixer(config, layer_idx, config.num_attention_heads)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, **mixer_kwargs: Any) -> tuple[torch.Tensor, Any]:
        mixed, attentions = mix(self.self_attn, self.input_layernorm(hidden_states), **mixer_kwargs)
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), attentions


class MixerLlamaPreTrainedModel(MixerPreTrainedMixin, LlamaPreTrainedModel):
    config_class = MixerLlamaConfig
    _no_split_modules = ["MixerLlamaDecoderLayer"]
    # Llama's claims that do not hold here: the forward collects hidden states and attentions itself,
    # the fla Cache is no static cache (no full-graph compiled decoding), the mixers other than
    # attention have other projections (no tensor-parallel plan), and no attention kernel is chosen
    # through transformers
    _can_record_outputs = None
    _can_compile_fullgraph = False
    _tp_plan = None
    _pp_plan = None
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    remote_classes = auto_classes("MixerLlama")


class MixerLlamaModel(MixerDecoderMixin, MixerLlamaPreTrainedModel):
    _input_embed_layer = "embed_tokens"
    final_norm_layer = "norm"

    def __init__(self, config: MixerLlamaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.build_decoder(MixerLlamaDecoderLayer, LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps))


class MixerLlamaForCausalLM(CausalLMGenerationMixin, MixerLlamaPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    decoder_class = MixerLlamaModel


class MixerMambaBlock(GradientCheckpointingLayer):
    """Mamba's residual block, x += mixer(RMSNorm(x)), with any mixer as ``mixer``."""

    def __init__(self, config: MixerMambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = layer_mixer(config, layer_idx, config.num_heads)

    def forward(self, hidden_states: torch.Tensor, **mixer_kwargs: Any) -> tuple[torch.Tensor, Any]:
        residual = hidden_states.to(torch.float32) if self.residual_in_fp32 else hidden_states
        mixed, attentions = mix(
            self.mixer, self.norm(hidden_states.to(dtype=self.norm.weight.dtype)), **mixer_kwargs
        )
        return residual + mixed, attentions


class MixerMambaPreTrainedModel(MixerPreTrainedMixin, MambaPreTrainedModel):
    config_class = MixerMambaConfig
    _no_split_modules = ["MixerMambaBlock"]
    remote_classes = auto_classes("MixerMamba")


class MixerMambaModel(MixerDecoderMixin, MixerMambaPreTrainedModel):
    _input_embed_layer = "embeddings"
    final_norm_layer = "norm_f"

    def __init__(self, config: MixerMambaConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.build_decoder(MixerMambaBlock, MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon))


class MixerMambaForCausalLM(CausalLMGenerationMixin, MixerMambaPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}
    decoder_attribute = "backbone"
    decoder_class = MixerMambaModel


class MixerMamba2Model(MixerMambaModel):
    """Mamba-2's backbone: transformers' ``Mamba2Model`` has Mamba's block layout and module names
    (``embeddings``, ``layers.N.norm``, ``layers.N.mixer``, ``norm_f``; its Mamba2RMSNorm computes
    what MambaRMSNorm does), so only the config differs."""

    config_class = MixerMamba2Config
    remote_classes = auto_classes("MixerMamba2")


class MixerMamba2ForCausalLM(MixerMambaForCausalLM):
    config_class = MixerMamba2Config
    remote_classes = auto_classes("MixerMamba2")
    decoder_class = MixerMamba2Model
