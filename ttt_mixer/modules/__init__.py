"""Plain PyTorch building blocks of the TTT layer and its backbones (they run on any device)."""

from ttt_mixer.modules.mlp import SwiGLU
from ttt_mixer.modules.rotary import apply_interleaved_rotary
from ttt_mixer.modules.short_conv import DepthwiseCausalConv

__all__ = ["DepthwiseCausalConv", "SwiGLU", "apply_interleaved_rotary"]
