"""ttt_mixer.adapters: put TTT, or any mixer it is compared with, into Llama (and full-attention
Mistral and Qwen2), Mamba and Mamba-2 backbones.

``swap_mixer`` swaps the mixer of some or all layers (from scratch or starting from attention),
``distill`` trains the swapped layers to reproduce the attention they replaced (LoLCATs' attention
transfer). The results are registered transformers classes that save and reload with
``trust_remote_code=True``, generate with a cache, and load in ``lm_eval --model hf``.

Importing the package runs :func:`import_adapters` (the backbones, ``swap_mixer``, ``distill``, their
registration with transformers' Auto classes), except under the ``ttt-mixer`` launcher, which defers
it as it defers ``ttt_mixer``'s own imports: then only the mixer registry (which imports nothing
heavy) is read, for ``swap``'s help, and the other names load on first use.
"""

from ttt_mixer import library_deferred
from ttt_mixer.adapters.mixers import MIXER_NAMES, build_mixer, recurrent_state_size

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
    "import_adapters",
    "parse_layers",
    "recurrent_state_size",
    "swap_mixer",
]


def import_adapters() -> None:
    """Import the library (``ttt_mixer.import_library``), the backbones, ``swap_mixer`` and
    ``distill``, and register the backbones' classes with transformers' Auto classes. Importing the
    package runs it; a second call does nothing new."""
    global MixerLlamaConfig, MixerMamba2Config, MixerMambaConfig, distill, parse_layers, swap_mixer
    global MixerLlamaForCausalLM, MixerLlamaModel, MixerMamba2ForCausalLM, MixerMamba2Model
    global MixerMambaForCausalLM, MixerMambaModel
    import ttt_mixer

    ttt_mixer.import_library()  # fla's import keeps transformers' model types only this way
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ttt_mixer.adapters.configuration import MixerLlamaConfig, MixerMamba2Config, MixerMambaConfig
    from ttt_mixer.adapters.distill import distill
    from ttt_mixer.adapters.modeling import (
        MixerLlamaForCausalLM,
        MixerLlamaModel,
        MixerMamba2ForCausalLM,
        MixerMamba2Model,
        MixerMambaForCausalLM,
        MixerMambaModel,
    )
    from ttt_mixer.adapters.swap import parse_layers, swap_mixer

    for config, model, lm in (
        (MixerLlamaConfig, MixerLlamaModel, MixerLlamaForCausalLM),
        (MixerMambaConfig, MixerMambaModel, MixerMambaForCausalLM),
        (MixerMamba2Config, MixerMamba2Model, MixerMamba2ForCausalLM),
    ):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)
        AutoModelForCausalLM.register(config, lm, exist_ok=True)


def __getattr__(name: str) -> object:
    # only reached while the launcher has deferred the imports: the names then load on first use
    if name in __all__:
        import_adapters()
        return globals()[name]
    raise AttributeError(f"module 'ttt_mixer.adapters' has no attribute {name!r}")


if not library_deferred():
    import_adapters()
