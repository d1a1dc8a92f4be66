"""Hugging Face TTT language models, registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ttt_mixer.models.configuration_ttt import TTTConfig
from ttt_mixer.models.modeling_ttt import TTTForCausalLM, TTTModel

AutoConfig.register(TTTConfig.model_type, TTTConfig, exist_ok=True)
AutoModel.register(TTTConfig, TTTModel, exist_ok=True)
AutoModelForCausalLM.register(TTTConfig, TTTForCausalLM, exist_ok=True)

__all__ = ["TTTConfig", "TTTForCausalLM", "TTTModel"]
