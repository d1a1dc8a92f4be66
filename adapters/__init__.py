"""ttt_mixer.adapters: put TTT, or any mixer it is compared with, into Llama (and full-attention
Mistral and Qwen2), Mamba and Mamba-2 backbones.

``swap_mixer`` swaps the mixer of some or all layers (from scratch or starting from attention),
``distill`` trains the swapped layers to reproduce the attention they replaced (LoLCATs' attention
transfer). The results are registered transformers classes that save and reload with
``trust_remote_code=True``, generate with a cache, and load in ``lm_eval --model hf``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ttt_mixer.adapters.configuration import MixerLlamaConfig, MixerMamba2Config, MixerMambaConfig
from ttt_mixer.adapters.distill import distill
from ttt_mixer.adapters.mixers import MIXER_NAMES, build_mixer, recurrent_state_size
from ttt_mixer.adapters.modeling import (
    MixerLlamaForCausalLM,
    MixerLlamaModel,
    MixerMamba2ForCausalLM,
    MixerMamba2Model,
    MixerMambaForCausalLM,
    MixerMambaModel,
)
from ttt_mixer.adapters.swap import parse_layers, swap_mixer

for _config, _model, _lm in (
    (MixerLlamaConfig, MixerLlamaModel, MixerLlamaForCausalLM),
    (MixerMambaConfig, MixerMambaModel, MixerMambaForCausalLM),
    (MixerMamba2Config, MixerMamba2Model, MixerMamba2ForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)

__all__ = [
    "MIXER_NAMES",
    "MixerLlamaConfig",
    "MixerLlamaForCausalLM",
    "MixerLlamaModel",
    "MixerMamba2Config",
    "MixerMamba2ForCausalLM",
    "MixerMamba2Model",
    "MixerMambaConfig",
    "MixerMambaForCausalLM",
    "MixerMambaModel",
    "build_mixer",
    "distill",
    "parse_layers",
    "recurrent_state_size",
    "swap_mixer",
]
