"""TTT as flash-linear-attention layers."""

from ttt_mixer.layers.ttt import TTTLayer, TTTLinear, TTTMLP

__all__ = ["TTTLayer", "TTTLinear", "TTTMLP"]
