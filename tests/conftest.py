"""Shared helpers of the layer, model and conversion tests: tiny seeded configs, models and layers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton tests (tests/ops/test_triton.py, the fla kernels compared in
# tests/adapters/test_adapter_mixers.py) run the kernels in Triton's interpreter. Triton reads the
# choice when it compiles a kernel's decorator, which happens when fla or ttt_mixer is imported, so it
# is made here, before any import of either; the PyTorch paths the other tests take never call Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from transformers import LlamaConfig

from ttt_mixer import TTTConfig, TTTForCausalLM, TTTLayer


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: offline (no hub), without the Triton interpreter that
    this process chose for its kernel tests (a subprocess runs the PyTorch paths), plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


# The tests run tiny tensors, for which one thread is fastest; several threads on a small or busy
# machine spin against each other and run ten to a hundred times slower.
torch.set_num_threads(1)
# Under pytest-xdist (scripts/test.sh runs a worker per core) the subprocesses that tests start take
# one thread too, so that two workers' subprocesses do not spin against each other either
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

INNER_MODELS = ("linear", "mlp")
BACKBONES = ("transformer", "mamba")
# (ttt_layer_type, backbone) of the four tiny language models
MODEL_CASES = [(inner, backbone) for inner in INNER_MODELS for backbone in BACKBONES]
MODEL_CASE_IDS = [f"{inner}-{backbone}" for inner, backbone in MODEL_CASES]
# swap_mixer options of the tiny models that swap mixers in (adapters, generation): small enough that
# every mixer runs its CPU path in well under a second; Based and Longhorn with the recall-gap preset's
# options (the plain ones are tests/adapters/test_adapter_mixers.py's; Mamba keeps none, as the Mamba
# backbone's own layers hold it without)
TINY_MIXER_OPTIONS = {
    "ttt_linear": {"mini_batch_size": 4},
    "ttt_mlp": {"mini_batch_size": 4},
    "based": {"use_short_conv": True},
    # a prefix of one token: the generation suite prefills a row in chunks holding one real token,
    # and a cached sequence may not stop inside its prefix (tests/adapters/test_jrt_rnn.py: longer ones)
    "jrt_rnn": {"prefix_length": 1, "use_short_conv": True},
    "longhorn": {"initializer_range": 0.1, "dt_bias_init": -3.0, "dt_rank": 8},
    "titans": {"mini_batch_size": 4},
    "lact": {"mini_batch_size": 4, "window_size": 3},
}

TINY_CONFIG = {
    "vocab_size": 50,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mini_batch_size": 4,
    "pad_token_id": 0,
    "bos_token_id": 1,
    # no end-of-sequence token: generation always runs for max_new_tokens, so results compare 1:1
    "eos_token_id": None,
}


# Two instances of one model (rebuilt, reloaded, loaded in another process) run the same
# computation, yet BLAS may pick other kernels or blockings for them (by CPU, threads, or where the
# fresh weights lie in memory), which reorders sums: 5.6e-16 was seen in float64 logits on an AVX-512
# CPU. The bounds allow a thousand times such reorderings (a few ulps per reduction through a tiny
# model) and stay far below what a wrong weight or another code path gives (1e-4 and more).
SAME_MODEL_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_same_model_outputs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Outputs of two instances of one model on the same inputs: equal up to summation order."""
    tolerance = SAME_MODEL_TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter, so that parameters initialised to constants
    (token-scale offsets, norms, inner biases, learning-rate biases) all matter in a comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.add_(scale * noise.to(parameter.dtype))
    return module


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A tiny Llama config with grouped keys and values: 3 layers of width 32, 4 query heads sharing 2
    key-value heads, vocabulary 40 (``overrides`` replace any field)."""
    fields = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1000.0,
    )
    return LlamaConfig(**(fields | overrides))


def make_config(ttt_layer_type: str = "linear", backbone: str = "transformer", **overrides) -> TTTConfig:
    return TTTConfig(ttt_layer_type=ttt_layer_type, backbone=backbone, **{**TINY_CONFIG, **overrides})


def make_model(
    ttt_layer_type: str = "linear",
    backbone: str = "transformer",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    perturb: float = 0.1,
    **overrides,
) -> TTTForCausalLM:
    """A tiny seeded TTTForCausalLM in eval mode; ``perturb`` > 0 adds that much noise to every
    parameter (initialised constants included)."""
    torch.manual_seed(seed)
    model = TTTForCausalLM(make_config(ttt_layer_type, backbone, **overrides))
    if perturb:
        perturb_(model, seed + 1, perturb)
    return model.to(dtype).eval()


def make_layer(
    inner_model: str = "linear",
    conv_gate: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    hidden_size: int = 16,
    num_heads: int = 2,
    mini_batch_size: int = 4,
    **kwargs,
) -> TTTLayer:
    """A seeded TTTLayer (layer_idx 0, so it can use a Cache) with every parameter perturbed;
    ``conv_gate`` turns on the Mamba-backbone form (share_qk and use_gate)."""
    torch.manual_seed(seed)
    layer = TTTLayer(
        hidden_size=hidden_size,
        num_heads=num_heads,
        inner_model=inner_model,
        mini_batch_size=mini_batch_size,
        share_qk=conv_gate,
        use_gate=conv_gate,
        layer_idx=0,
        **kwargs,
    )
    return perturb_(layer, seed + 1).to(dtype)


def greedy_without_cache(
    model: torch.nn.Module, ids: torch.Tensor, steps: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy decoding that recomputes the whole (growing) sequence at every step, no cache."""
    for _ in range(steps):
        logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


@pytest.fixture(scope="session")
def real_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a float32 checkpoint folder with its tokenizer (ttt_mixer.real_model:
    made once from the GGUF file scripts/setup.sh installs, cached in ~/.cache/ttt-mixer)."""
    from ttt_mixer.real_model import smollm2_checkpoint

    return smollm2_checkpoint()
