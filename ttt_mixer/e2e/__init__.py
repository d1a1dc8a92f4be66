"""TTT-E2E (end-to-end test-time training) as Hugging Face models: ``E2EConfig``, ``E2EModel``,
``E2EForCausalLM``. Nothing is registered with transformers' Auto classes on import: saved models
name these classes in their config's ``auto_map`` and load with ``trust_remote_code=True``."""

import ttt_mixer  # noqa: F401  (fla and the library, imported in their order)
from ttt_mixer.e2e.configuration_e2e import E2EConfig
from ttt_mixer.e2e.modeling_e2e import E2EForCausalLM, E2EModel

__all__ = ["E2EConfig", "E2EForCausalLM", "E2EModel"]
