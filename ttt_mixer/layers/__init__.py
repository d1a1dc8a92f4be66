"""TTT as flash-linear-attention layers: TTT-Linear and TTT-MLP, and the family's Titans and LaCT."""

from ttt_mixer.layers.ttt import TTTMLP, TTTLayer, TTTLinear
from ttt_mixer.layers.ttt_family import FAMILY_PRESETS, TTTFamilyLayer

__all__ = ["FAMILY_PRESETS", "TTTMLP", "TTTFamilyLayer", "TTTLayer", "TTTLinear"]
