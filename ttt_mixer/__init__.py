"""ttt-mixer: Test-Time-Training sequence mixers (TTT-Linear, TTT-MLP) for flash-linear-attention
and Hugging Face transformers. Importing it registers TTTConfig/TTTModel/TTTForCausalLM with the
transformers Auto classes, and leaves transformers' own model types mapped as they were (fla's
import registers its Mamba under transformers' "mamba"; see ttt_mixer/_registry.py).

The ``ttt-mixer`` command is the one exception: its launcher (``ttt_mixer_cli``) imports the package
with these imports deferred, so that its help and ``tasks-path`` start in a second, and calls
:func:`import_library` before any command that needs them.
"""

import sys

__version__ = "0.1.0"
__all__ = ["TTTMLP", "TTTConfig", "TTTForCausalLM", "TTTLayer", "TTTLinear", "TTTModel", "import_library"]


def library_deferred() -> bool:
    """Whether the ``ttt-mixer`` launcher has deferred the heavy imports (of this package and of
    ``ttt_mixer.adapters``) in this process."""
    return getattr(sys.modules.get("ttt_mixer_cli"), "library_deferred", False)


def import_library() -> None:
    """Import fla (keeping transformers' model types, ``_registry``), the layers and the models, which
    registers the TTT classes with transformers' Auto classes. ``import ttt_mixer`` runs it; a second
    call does nothing new."""
    global TTTMLP, TTTConfig, TTTForCausalLM, TTTLayer, TTTLinear, TTTModel
    import warnings

    from ttt_mixer._registry import transformers_model_types_kept

    with warnings.catch_warnings(), transformers_model_types_kept():
        # Importing fla warns that Triton has no GPU backend on a machine without one, and trips a
        # torch deprecation inside fla; neither is the user's to act on (on CPU our PyTorch path needs
        # no Triton), so both are silenced for this import only.
        warnings.filterwarnings(
            "ignore", message="Triton is not supported on current platform", category=UserWarning
        )
        warnings.filterwarnings(
            "ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning
        )
        import fla  # noqa: F401

    from ttt_mixer.layers import TTTMLP, TTTLayer, TTTLinear
    from ttt_mixer.models import TTTConfig, TTTForCausalLM, TTTModel


def __getattr__(name: str) -> object:
    # only reached while the launcher has deferred the library: its names then load on first use
    if name in __all__:
        import_library()
        return globals()[name]
    raise AttributeError(f"module 'ttt_mixer' has no attribute {name!r}")


if not library_deferred():
    import_library()
