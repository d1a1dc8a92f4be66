"""ttt-mixer: Test-Time-Training sequence mixers (TTT-Linear, TTT-MLP) for flash-linear-attention
and Hugging Face transformers. Importing it registers TTTConfig/TTTModel/TTTForCausalLM with the
transformers Auto classes, and leaves transformers' own model types mapped as they were (fla's
import registers its Mamba under transformers' "mamba"; see ttt_mixer/_registry.py)."""

import warnings

from ttt_mixer._registry import transformers_model_types_kept

with warnings.catch_warnings(), transformers_model_types_kept():
    # Importing fla warns that Triton has no GPU backend on a machine without one, and trips a torch
    # deprecation inside fla; neither is the user's to act on (on CPU our PyTorch path needs no
    # Triton), so both are silenced for this import only.
    warnings.filterwarnings(
        "ignore", message="Triton is not supported on current platform", category=UserWarning
    )
    warnings.filterwarnings(
        "ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning
    )
    import fla  # noqa: F401

from ttt_mixer.layers import TTTMLP, TTTLayer, TTTLinear
from ttt_mixer.models import TTTConfig, TTTForCausalLM, TTTModel

__version__ = "0.1.0"
__all__ = ["TTTMLP", "TTTConfig", "TTTForCausalLM", "TTTLayer", "TTTLinear", "TTTModel"]
