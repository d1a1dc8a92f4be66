"""Checks shared by the tests of the recurrent adapter mixers (Longhorn, Mamba-2, JRT-RNN), in float64: a cached
run in pieces against the one pass, gradients through the cache, and padding skipped."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from fla.models.utils import Cache
from torch import nn

# float64, the same computation in another order
EXACT = 1e-12
# float64 gradients through a prefill and its continuation against the one pass
GRADIENT_TOLERANCE = 1e-10


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def max_err(a: torch.Tensor | tuple | None, b: torch.Tensor | tuple | None) -> float:
    """The largest absolute difference, over the tensors of a state tuple too (None equals None)."""
    if isinstance(a, (tuple, list)):
        return max(max_err(x, y) for x, y in zip(a, b, strict=True))
    if a is None and b is None:
        return 0.0
    return (a - b).abs().max().item()


def assert_cached_splits_match(
    mixer: nn.Module, x: torch.Tensor, splits: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, dict]:
    """``x`` [B, T, D] through ``mixer`` in one cached pass, then in the cached pieces of every split
    of T (lists of piece lengths): each split's outputs and final states (``recurrent_state`` and
    ``conv_state``) equal the one pass's. Returns the one pass's output and its cache entry."""
    full_cache = Cache()
    with torch.no_grad():
        full = mixer(x, past_key_values=full_cache, use_cache=True)[0]
        for split in splits:
            cache, outputs, start = Cache(), [], 0
            for size in split:
                outputs.append(mixer(x[:, start : start + size], past_key_values=cache, use_cache=True)[0])
                start += size
            assert max_err(torch.cat(outputs, 1), full) <= EXACT, split
            for key in ("recurrent_state", "conv_state"):
                assert max_err(cache[0][key], full_cache[0][key]) <= EXACT, (key, split)
    return full, full_cache[0]


def assert_split_gradients_match(
    mixer: nn.Module, x: torch.Tensor, weights: torch.Tensor, split_at: int
) -> None:
    """In training mode, a prefill of ``split_at`` tokens and its cached continuation give the one
    pass's gradients of the input and of every parameter (loss: the outputs weighted by ``weights``)."""
    mixer.train()
    inputs = x.clone().requires_grad_()
    params = [inputs, *mixer.parameters()]
    grads = torch.autograd.grad((mixer(inputs)[0] * weights).sum(), params)
    cache = Cache()
    first = mixer(inputs[:, :split_at], past_key_values=cache, use_cache=True)[0]
    second = mixer(inputs[:, split_at:], past_key_values=cache, use_cache=True)[0]
    split = torch.autograd.grad((torch.cat([first, second], 1) * weights).sum(), params)
    for name, g, g_split in zip(["input", *dict(mixer.named_parameters())], grads, split, strict=True):
        assert max_err(g, g_split) <= GRADIENT_TOLERANCE, name


def assert_padding_skipped(
    mixer: nn.Module, x: torch.Tensor, mask: torch.Tensor, pieces: Sequence[tuple[int, int]]
) -> None:
    """``x`` through ``mixer`` in the cached ``pieces`` (start, end) under the padding ``mask`` [B, T]:
    each row's real tokens give that row's outputs alone, its padded positions 0."""
    cache = Cache()
    with torch.no_grad():
        outputs = [
            mixer(x[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True)[0]
            for a, b in pieces
        ]
        padded = torch.cat(outputs, 1)
        for row in range(x.shape[0]):
            real = mask[row].bool()
            assert max_err(padded[row, real], mixer(x[row : row + 1, real])[0][0]) <= EXACT, row
            assert padded[row, ~real].abs().max() == 0
