"""The sequence mixers a backbone layer can hold, all on fla's layer interface:

    mixer(hidden_states [B, T, D], attention_mask=None, past_key_values=None, use_cache=False, **kwargs)
        -> (o [B, T, D], None, past_key_values)

with their state in fla's ``Cache`` at ``mixer.layer_idx`` and a 2-D padding mask whose last T
columns cover the new tokens. Every mixer runs on CPU in plain PyTorch; on CUDA the fla mixers run
fla's Triton kernels. ``registry`` lists them: one ``MixerSpec`` per mixer.
"""

from __future__ import annotations

from ttt_mixer.adapters.mixers.attention import CachedAttention
from ttt_mixer.adapters.mixers.based import BasedMixer
from ttt_mixer.adapters.mixers.gated_deltanet import GatedDeltaNetMixer
from ttt_mixer.adapters.mixers.gla import GLAMixer
from ttt_mixer.adapters.mixers.jrt_rnn import JRTRNNMixer
from ttt_mixer.adapters.mixers.longhorn import LonghornMixer
from ttt_mixer.adapters.mixers.mamba import CachedMambaMixer, MambaLayerState
from ttt_mixer.adapters.mixers.registry import (
    MIXER_NAMES,
    MIXERS,
    MixerSpec,
    build_mixer,
    mixer_spec,
    recurrent_state_size,
)

__all__ = [
    "MIXERS",
    "MIXER_NAMES",
    "BasedMixer",
    "CachedAttention",
    "CachedMambaMixer",
    "GLAMixer",
    "GatedDeltaNetMixer",
    "JRTRNNMixer",
    "LonghornMixer",
    "MambaLayerState",
    "MixerSpec",
    "build_mixer",
    "mixer_spec",
    "recurrent_state_size",
]
