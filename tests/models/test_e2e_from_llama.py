"""A Llama made TTT-E2E (``ttt_mixer.e2e.from_llama``): before any inner step it computes the Llama's
logits (grouped keys and values repeated, q/k rows reordered for interleaved RoPE, the inner MLPs'
down projections at zero), the first step changes the next mini-batch only, settings it cannot
compute are refused; and SmolLM2-135M (the real-model fixture) converts the same way."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ttt_mixer.e2e.from_llama import from_llama

# both codes compute RoPE's angles in float32, in different orders of products, so float64 models
# agree to about float32's rounding of the angles (6e-8 measured)
ROPE_ANGLE_TOLERANCE = 1e-6


def tiny_llama(**overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).double().eval()


@pytest.mark.parametrize("tied", [True, False])
def test_before_any_inner_step_it_computes_the_llamas_logits(tied: bool) -> None:
    llama = tiny_llama(tie_word_embeddings=tied)
    tokens = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(1))
    frozen = from_llama(llama, suffix_len=2, mini_batch_size=4, sliding_window_size=32, inner_lr=0.0)
    learning = from_llama(llama, suffix_len=2, mini_batch_size=4, sliding_window_size=32)
    with torch.no_grad():
        expected, static, learned = llama(tokens).logits, frozen(tokens).logits, learning(tokens).logits
    torch.testing.assert_close(static, expected, rtol=0, atol=ROPE_ANGLE_TOLERANCE)
    torch.testing.assert_close(learned[:, :4], expected[:, :4], rtol=0, atol=ROPE_ANGLE_TOLERANCE)
    assert (learned[:, 4:] - expected[:, 4:]).abs().amax() > 1e-3


def test_settings_it_cannot_compute_are_refused() -> None:
    with pytest.raises(ValueError, match="attention_bias"):
        from_llama(tiny_llama(attention_bias=True), suffix_len=1, mini_batch_size=4, sliding_window_size=8)
    qwen2 = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    )
    with pytest.raises(ValueError, match="q, k and v projections have biases"):  # refused, not dropped
        from_llama(qwen2, suffix_len=1, mini_batch_size=4, sliding_window_size=8)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        from_llama(torch.nn.Linear(2, 2), suffix_len=1, mini_batch_size=4, sliding_window_size=8)


@pytest.mark.slow
def test_smollm2_made_ttt_e2e_keeps_its_logits_before_learning(real_checkpoint) -> None:
    llama = AutoModelForCausalLM.from_pretrained(real_checkpoint).eval()
    tokens = AutoTokenizer.from_pretrained(real_checkpoint)(
        "The cat sat on the mat.", return_tensors="pt"
    ).input_ids
    e2e = from_llama(llama, suffix_len=6, mini_batch_size=16, sliding_window_size=64, inner_lr=0.0)
    with torch.no_grad():
        torch.testing.assert_close(e2e(tokens).logits, llama(tokens).logits, rtol=0, atol=1e-3)
