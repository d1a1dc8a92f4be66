"""TTT as flash-linear-attention layers."""

from ttt_mixer.layers.ttt import TTTMLP, TTTLayer, TTTLinear

__all__ = ["TTTMLP", "TTTLayer", "TTTLinear"]
