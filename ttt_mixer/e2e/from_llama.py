"""A pretrained Llama (e.g. SmolLM2) made TTT-E2E: its blocks with sliding-window attention, and in
the last ``suffix_len`` blocks an inner MLP that starts from the block's own MLP with its down
projection at zero, so that before any inner step the model computes what the Llama computes
(within the window). Continued training then meta-learns the inner MLPs' initialisation
(docs/math.md section 16)."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from ttt_mixer.e2e.configuration_e2e import E2EConfig
from ttt_mixer.e2e.modeling_e2e import E2EForCausalLM


def interleaved_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A q or k projection [heads * d, D] for half-split RoPE (Llama's ``rotate_half``: feature m
    rotates with m + d/2) with its rows reordered for interleaved RoPE (feature 2m with 2m + 1, the
    same frequency): the same attention scores."""
    d = weight.shape[0] // heads
    order = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()
    return weight.view(heads, d, -1)[:, order].reshape(heads * d, -1)


def rope_parameters(config: object) -> dict:
    """RoPE's settings: ``rope_parameters`` (transformers 5) or ``rope_scaling`` and ``rope_theta``."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def check_llama(config: object) -> None:
    """ValueError unless ``config`` is a Llama's (Qwen2's q, k and v biases have no place in TTT-E2E's
    attention, and are refused rather than dropped), naming the first setting TTT-E2E's blocks
    cannot compute."""
    model_type = getattr(config, "model_type", None)
    if model_type == "qwen2":
        raise ValueError(
            "a Qwen2 model cannot be made TTT-E2E exactly: its q, k and v projections have biases and "
            "TTT-E2E's attention has none (dropping them would change the model); give a Llama"
        )
    if model_type != "llama":
        raise ValueError(f"TTT-E2E is made from a Llama (model_type 'llama'), got model_type {model_type!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    checks = (
        ("hidden_act", config.hidden_act == "silu", "silu"),
        ("attention_bias", not config.attention_bias, "False"),
        ("mlp_bias", not getattr(config, "mlp_bias", False), "False"),
        (
            "head_dim",
            head_dim * config.num_attention_heads == config.hidden_size,
            "hidden_size / num_attention_heads",
        ),
        ("rope_parameters", rope_parameters(config).get("rope_type", "default") == "default", "plain RoPE"),
    )
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(
                f"the Llama's {name} must be {expected} for TTT-E2E, got {getattr(config, name, None)!r}"
            )


def from_llama(
    llama: LlamaForCausalLM,
    suffix_len: int,
    mini_batch_size: int,
    sliding_window_size: int,
    inner_lr: float = 1.0,
    inner_clip_gradient: float = 1.0,
) -> E2EForCausalLM:
    """``E2EForCausalLM`` with ``llama``'s weights (in its dtype): grouped keys and values repeated
    to every head, q and k rows reordered for interleaved RoPE (``interleaved_rotary_rows``), no
    post-norms and no QK-norm (Llama has neither); the last ``suffix_len`` blocks' inner MLPs start
    as their MLP (its norm, gate and up) with a zero down projection."""
    if isinstance(llama, PreTrainedModel):
        check_llama(llama.config)  # a Qwen2 or another model's type: the reason first
    if not isinstance(llama, LlamaForCausalLM):
        raise TypeError(f"llama must be a transformers LlamaForCausalLM, got {type(llama).__name__}")
    source = llama.config
    rope = rope_parameters(source)
    config = E2EConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        mini_batch_size=mini_batch_size,
        sliding_window_size=sliding_window_size,
        suffix_len=suffix_len,
        inner_lr=inner_lr,
        inner_clip_gradient=inner_clip_gradient,
        qk_norm=False,
        pre_norm=True,
        post_norm=False,
        rope_theta=float(rope.get("rope_theta", getattr(source, "rope_theta", 10000.0))),
        rms_norm_eps=source.rms_norm_eps,
        initializer_range=source.initializer_range,
        pad_token_id=source.pad_token_id,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        tie_word_embeddings=source.tie_word_embeddings,
    )
    heads, groups = source.num_attention_heads, source.num_attention_heads // source.num_key_value_heads
    weights = llama.state_dict()
    state = {
        "model.embeddings.weight": weights["model.embed_tokens.weight"],
        "model.norm.weight": weights["model.norm.weight"],
        "lm_head.weight": weights["lm_head.weight"],
    }
    first_suffix = config.num_hidden_layers - suffix_len
    for i in range(config.num_hidden_layers):
        theirs, ours = f"model.layers.{i}.", f"model.layers.{i}."
        # grouped heads: kv head h serves query heads h * groups .. (h + 1) * groups - 1
        key, value = (
            weights[f"{theirs}self_attn.{name}_proj.weight"]
            .unflatten(0, (source.num_key_value_heads, -1))
            .repeat_interleave(groups, dim=0)
            .flatten(0, 1)
            for name in ("k", "v")
        )
        state |= {
            f"{ours}attn_norm.weight": weights[f"{theirs}input_layernorm.weight"],
            f"{ours}attn.q_proj.weight": interleaved_rotary_rows(
                weights[f"{theirs}self_attn.q_proj.weight"], heads
            ),
            f"{ours}attn.k_proj.weight": interleaved_rotary_rows(key, heads),
            f"{ours}attn.v_proj.weight": value,
            f"{ours}attn.o_proj.weight": weights[f"{theirs}self_attn.o_proj.weight"],
            f"{ours}mlp_norm.weight": weights[f"{theirs}post_attention_layernorm.weight"],
        }
        for name in ("gate", "up", "down"):
            state[f"{ours}mlp.{name}_proj.weight"] = weights[f"{theirs}mlp.{name}_proj.weight"]
        if i >= first_suffix:
            state[f"{ours}feed_forward_prime_norm.weight"] = weights[
                f"{theirs}post_attention_layernorm.weight"
            ]
            state[f"{ours}feed_forward_prime.gate_proj.weight"] = weights[f"{theirs}mlp.gate_proj.weight"]
            state[f"{ours}feed_forward_prime.up_proj.weight"] = weights[f"{theirs}mlp.up_proj.weight"]
            state[f"{ours}feed_forward_prime.down_proj.weight"] = torch.zeros_like(
                weights[f"{theirs}mlp.down_proj.weight"]
            )
    model = E2EForCausalLM(config).to(weights["model.embed_tokens.weight"].dtype)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    return model.eval()
