"""Input checks shared by the TTT layer, the TTT models and the adapters' mixers, each written once:
hidden states, padding masks, a cache's batch and backend names."""

from __future__ import annotations

import math
import os

import torch

from ttt_mixer.ops import BACKENDS

BACKEND_NAMES = BACKENDS
BACKEND_ENV = "TTT_MIXER_BACKEND"


def check_backend(backend: str | None, source: str = "backend") -> None:
    """ValueError unless ``backend`` is None or one of BACKEND_NAMES; ``source`` names where it came from."""
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {backend!r}")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The ``backend`` argument, else the TTT_MIXER_BACKEND environment variable, else Triton on
    CUDA tensors and PyTorch elsewhere."""
    if backend is None and os.environ.get(BACKEND_ENV):
        check_backend(os.environ[BACKEND_ENV], BACKEND_ENV)
        return os.environ[BACKEND_ENV]
    check_backend(backend)
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    return backend


def check_hidden_states(
    owner: str, hidden_states: torch.Tensor, hidden_size: int, dtype: torch.dtype | None = None
) -> tuple[int, int]:
    """(batch_size, seq_len) of ``hidden_states``; an error naming ``owner`` unless it is a floating
    tensor [batch_size, seq_len >= 1, hidden_size] of the module's ``dtype`` (any floating dtype under
    autocast, which mixes them on purpose)."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        raise ValueError(
            f"{owner}: hidden_states must be a tensor of shape [batch_size, seq_len, hidden_size]"
        )
    if not hidden_states.is_floating_point():
        raise TypeError(f"{owner}: hidden_states must be floating point, got {hidden_states.dtype}")
    if hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"{owner}: hidden_states last dim must be hidden_size = {hidden_size}, got {hidden_states.shape[-1]}"
        )
    if (
        dtype is not None
        and hidden_states.dtype != dtype
        and not torch.is_autocast_enabled(hidden_states.device.type)
    ):
        raise TypeError(
            f"{owner}: hidden_states must have the module's dtype {dtype}, got {hidden_states.dtype}"
        )
    batch_size, seq_len, _ = hidden_states.shape
    if batch_size == 0:
        raise ValueError(f"{owner}: hidden_states must hold at least one sequence (batch_size >= 1)")
    if seq_len == 0:
        raise ValueError(f"{owner}: hidden_states must hold at least one token (seq_len >= 1)")
    return batch_size, seq_len


def check_attention_mask(attention_mask: torch.Tensor, batch_size: int, q_len: int) -> None:
    """ValueError unless ``attention_mask`` is a 0/1 padding mask [batch_size, >= q_len] whose last
    q_len columns cover the new tokens."""
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < q_len:
        raise ValueError(
            "attention_mask must be a 0/1 padding mask of shape [batch_size, seq_len >= q_len] = "
            f"[{batch_size}, >= {q_len}], got {list(attention_mask.shape)}"
        )
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")


def padding_mask(attention_mask: torch.Tensor | None, batch_size: int, q_len: int) -> torch.Tensor | None:
    """The checked mask of the q_len new tokens as bool [batch_size, q_len], or None when all are real."""
    if attention_mask is None:
        return None
    check_attention_mask(attention_mask, batch_size, q_len)
    mask = attention_mask[:, -q_len:].bool()
    return None if bool(mask.all()) else mask


def check_cache_batch(owner: str, cached: int, batch_size: int) -> None:
    """ValueError unless a cache holding ``cached`` sequences fits an input of ``batch_size``."""
    if cached != batch_size:
        raise ValueError(f"{owner}: the cache holds {cached} sequences but the input has {batch_size}")


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """TypeError unless ``value`` is an int (not a bool), ValueError unless it is >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_positive_float(name: str, value: object) -> None:
    """TypeError unless ``value`` is a real number (not a bool), ValueError unless finite and > 0."""
    check_finite_float(name, value, "a finite number > 0")
    if value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_finite_float(name: str, value: object, expected: str = "a finite number") -> None:
    """TypeError unless ``value`` is a real number (not a bool), ValueError unless finite; the
    messages say ``value`` must be ``expected``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_heads_divide_width(options: dict[str, object], names: dict[str, str]) -> None:
    """ValueError unless the options' ``hidden_size`` is a multiple of their ``num_heads``; ``names``
    maps an option to the name its caller knows it by, for the message."""
    if options["hidden_size"] % options["num_heads"]:
        raise ValueError(
            f"{names.get('hidden_size', 'hidden_size')} ({options['hidden_size']}) must be divisible by "
            f"{names.get('num_heads', 'num_heads')} ({options['num_heads']})"
        )


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
