"""Llama and Mamba backbones whose layers each hold a chosen sequence mixer.

Parameter names follow transformers' ``LlamaForCausalLM`` and ``MambaForCausalLM``, so a layer left as
it was keeps its checkpoint keys. Every mixer follows fla's layer interface and keeps its state in
one fla ``Cache``: attention its keys and values, TTT and the linear mixers their recurrent state,
Mamba its convolution and SSM states; fla's generation mixin carries that cache through ``generate``.
Padding reaches each mixer as the 2-D mask, which every mixer honours exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from fla.models.cache_utils import Cache
from torch import nn
from transformers import LlamaPreTrainedModel, MambaPreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.mamba.modeling_mamba import MambaMixer, MambaRMSNorm
from ttt_mixer.adapters.configuration import MixerLlamaConfig, MixerMambaConfig
from ttt_mixer.adapters.mixers import build_mixer

from ttt_mixer.layers import TTTLayer
from ttt_mixer.models.hub import CausalLMGenerationMixin, RemoteCodeMixin, decoder_inputs, decoder_output

# keyword arguments that generation passes and the mixers do not need: positions come from the cache
# and the padding mask
GENERATION_ONLY_KWARGS = ("cache_position",)


def layer_mixer(config: MixerLlamaConfig | MixerMambaConfig, layer_idx: int, num_heads: int) -> nn.Module:
    name = config.mixers[layer_idx]
    options = dict(config.mixer_options.get(name, {}))
    num_heads = options.pop("num_heads", num_heads)
    return build_mixer(name, config.hidden_size, num_heads, layer_idx, config, **options)


class MixerPreTrainedMixin(RemoteCodeMixin):
    """Weight init and saving shared by both backbones: the backbone's init for its own modules,
    then each mixer's own init where it has one (TTT's inner model, Mamba's S4D and dt init)."""

    remote_module = "ttt_mixer.adapters"
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TTTLayer):
            module.reset_parameters()
        elif isinstance(module, MambaMixer):
            module.init_mamba_weights()


class MixerDecoderMixin:
    """Embeddings -> mixer blocks -> final norm, with one fla ``Cache`` for every layer."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """``attention_mask``: 2-D padding mask over the cached and new tokens; ``position_ids`` (optional)
        reach the attention layers, the recurrent mixers take positions from their state."""
        unexpected = sorted(set(kwargs) - {"position_ids", *GENERATION_ONLY_KWARGS})
        if unexpected:
            raise TypeError(f"{type(self).__name__}.forward got unexpected keyword arguments {unexpected}")
        inputs_embeds, past_key_values, use_cache = decoder_inputs(
            self, input_ids, inputs_embeds, past_key_values, use_cache
        )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_ids=kwargs.get("position_ids"),
            )
        hidden_states = self.final_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return decoder_output(self, hidden_states, past_key_values, use_cache, all_hidden_states, return_dict)


def mix(mixer: nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    output, _, _ = mixer(hidden_states, **kwargs)
    return output


class MixerLlamaDecoderLayer(GradientCheckpointingLayer):
    """Llama's decoder layer, x += mixer(RMSNorm(x)); x += MLP(RMSNorm(x)), with any mixer as
    ``self_attn``."""

    def __init__(self, config: MixerLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = layer_mixer(config, layer_idx, config.num_attention_heads)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, **mixer_kwargs: Any) -> torch.Tensor:
        hidden_states = hidden_states + mix(
            self.self_attn, self.input_layernorm(hidden_states), **mixer_kwargs
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MixerLlamaPreTrainedModel(MixerPreTrainedMixin, LlamaPreTrainedModel):
    config_class = MixerLlamaConfig
    _no_split_modules = ["MixerLlamaDecoderLayer"]
    remote_classes = {
        "AutoConfig": "MixerLlamaConfig",
        "AutoModel": "MixerLlamaModel",
        "AutoModelForCausalLM": "MixerLlamaForCausalLM",
    }


class MixerLlamaModel(MixerDecoderMixin, MixerLlamaPreTrainedModel):
    def __init__(self, config: MixerLlamaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            MixerLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_states)


class MixerLlamaForCausalLM(CausalLMGenerationMixin, MixerLlamaPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MixerLlamaConfig) -> None:
        super().__init__(config)
        self.model = MixerLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class MixerMambaBlock(GradientCheckpointingLayer):
    """Mamba's residual block, x += mixer(RMSNorm(x)), with any mixer as ``mixer``."""

    def __init__(self, config: MixerMambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = layer_mixer(config, layer_idx, config.num_heads)

    def forward(self, hidden_states: torch.Tensor, **mixer_kwargs: Any) -> torch.Tensor:
        residual = hidden_states.to(torch.float32) if self.residual_in_fp32 else hidden_states
        mixed = mix(self.mixer, self.norm(hidden_states.to(dtype=self.norm.weight.dtype)), **mixer_kwargs)
        return residual + mixed


class MixerMambaPreTrainedModel(MixerPreTrainedMixin, MambaPreTrainedModel):
    config_class = MixerMambaConfig
    _no_split_modules = ["MixerMambaBlock"]
    remote_classes = {
        "AutoConfig": "MixerMambaConfig",
        "AutoModel": "MixerMambaModel",
        "AutoModelForCausalLM": "MixerMambaForCausalLM",
    }


class MixerMambaModel(MixerDecoderMixin, MixerMambaPreTrainedModel):
    def __init__(self, config: MixerMambaConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MixerMambaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm_f(hidden_states)


class MixerMambaForCausalLM(CausalLMGenerationMixin, MixerMambaPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}
    decoder_attribute = "backbone"

    def __init__(self, config: MixerMambaConfig) -> None:
        super().__init__(config)
        self.backbone = MixerMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
