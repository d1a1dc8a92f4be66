"""TTT-E2E (end-to-end test-time training) as Hugging Face models: ``E2EConfig``, ``E2EModel``,
``E2EForCausalLM``, registered with the Auto classes on import under their own model type
(``ttt_e2e``), as ``ttt_mixer.models`` registers the TTT models. Saved models also name these classes
in their config's ``auto_map``, so they load with ``trust_remote_code=True`` in a process that never
imported ttt_mixer; in one that did, the registered classes load them, and a model loaded either way
saves the same ``auto_map`` again (no copy of this package's source in the folder)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import ttt_mixer  # noqa: F401  (fla and the library, imported in their order)
from ttt_mixer.e2e.configuration_e2e import E2EConfig
from ttt_mixer.e2e.modeling_e2e import E2EForCausalLM, E2EModel

AutoConfig.register(E2EConfig.model_type, E2EConfig, exist_ok=True)
AutoModel.register(E2EConfig, E2EModel, exist_ok=True)
AutoModelForCausalLM.register(E2EConfig, E2EForCausalLM, exist_ok=True)

__all__ = ["E2EConfig", "E2EForCausalLM", "E2EModel"]
