"""ttt-mixer: Test-Time-Training sequence mixers (TTT-Linear, TTT-MLP) for flash-linear-attention
and Hugging Face transformers. Importing it registers TTTConfig/TTTModel/TTTForCausalLM with the
transformers Auto classes."""

from ttt_mixer.layers import TTTMLP, TTTLayer, TTTLinear
from ttt_mixer.models import TTTConfig, TTTForCausalLM, TTTModel

__version__ = "0.1.0"
__all__ = ["TTTMLP", "TTTConfig", "TTTForCausalLM", "TTTLayer", "TTTLinear", "TTTModel"]
