from __future__ import annotations

import inspect

from transformers.configuration_utils import PretrainedConfig

from ttt_mixer.layers.checks import check_bool, check_finite_float, check_int, check_positive_float
from ttt_mixer.models.configuration_ttt import reject_unknown_fields


def check_non_negative_float(name: str, value: object) -> None:
    """TypeError unless ``value`` is a real number (not a bool), ValueError unless finite and >= 0."""
    check_finite_float(name, value, "a finite number >= 0")
    if value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class E2EConfig(PretrainedConfig):
    """Configuration of a TTT-E2E language model (``E2EModel``, ``E2EForCausalLM``; docs/math.md
    section 16): a Transformer with sliding-window attention whose last ``suffix_len`` blocks carry a
    second SwiGLU MLP, the inner model, trained at test time by one SGD step per ``mini_batch_size``
    tokens on their next-token loss.

    Field names follow the authors' ``ModelConfig`` (their ``ttt/config.py``) where they have one;
    ``inner_lr`` and ``inner_clip_gradient`` are their ``optimizer_inner.lr`` and
    ``optimizer_inner.clip_gradient`` (0: no clipping). Their ``prime`` flag is implied: the suffix
    blocks always have the inner MLP, and ``suffix_len=0`` is a plain sliding-window Transformer.
    """

    model_type = "ttt_e2e"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mini_batch_size: int = 1024,
        sliding_window_size: int = 1024,
        suffix_len: int = 3,
        inner_lr: float = 1.0,
        inner_clip_gradient: float = 1.0,
        qk_norm: bool = True,
        pre_norm: bool = True,
        post_norm: bool = True,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        reject_unknown_fields(type(self).__name__, kwargs, inspect.signature(type(self).__init__).parameters)
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("mini_batch_size", mini_batch_size),
            ("sliding_window_size", sliding_window_size),
        ):
            check_int(name, value)
        check_int("suffix_len", suffix_len, minimum=0)
        if suffix_len > num_hidden_layers:
            raise ValueError(
                f"suffix_len must be at most num_hidden_layers = {num_hidden_layers}, got {suffix_len}"
            )
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 2:
            raise ValueError(
                "hidden_size must be num_attention_heads times an even head size (rotary pairs), got "
                f"hidden_size={hidden_size}, num_attention_heads={num_attention_heads}"
            )
        check_non_negative_float("inner_lr", inner_lr)
        check_non_negative_float("inner_clip_gradient", inner_clip_gradient)
        check_positive_float("rope_theta", rope_theta)
        check_positive_float("rms_norm_eps", rms_norm_eps)
        for name, value in (("qk_norm", qk_norm), ("pre_norm", pre_norm), ("post_norm", post_norm)):
            check_bool(name, value)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mini_batch_size = mini_batch_size
        self.sliding_window_size = sliding_window_size
        self.suffix_len = suffix_len
        self.inner_lr = inner_lr
        self.inner_clip_gradient = inner_clip_gradient
        self.qk_norm = qk_norm
        self.pre_norm = pre_norm
        self.post_norm = post_norm
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
