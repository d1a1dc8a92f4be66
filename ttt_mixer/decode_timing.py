"""Decode speed of a causal LM with its cache: milliseconds per single-token step at several context
lengths, timed so that machine noise hits every length alike (the demo and the benchmarks use it)."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import PreTrainedModel

from ttt_mixer.models.causal_lm import CACHE_FIELD


def decode_ms_per_step(
    model: PreTrainedModel,
    contexts: tuple[int, ...],
    batch_size: int,
    steps: int,
    generator: torch.Generator,
    repeats: int = 1,
    warmup: int = 0,
) -> dict[int, dict[str, float]]:
    """ms per single-token step (one token for each of ``batch_size`` sequences) with the cache
    holding each context length of random tokens.

    Every repeat prefills one cache per context length (not timed), then takes ``steps`` steps on
    each, alternating between the caches step by step and timing every step on its own. ``median``
    is the median over all timed steps (robust to the scheduler preempting a step on a busy
    machine), ``mean`` the plain average."""
    vocab = model.config.vocab_size
    prompts = {c: torch.randint(0, vocab, (batch_size, c), generator=generator) for c in contexts}
    tokens = torch.randint(0, vocab, (batch_size, steps), generator=generator)

    def run() -> dict[int, list[float]]:
        times: dict[int, list[float]] = {c: [] for c in contexts}
        with torch.no_grad():
            caches = {c: getattr(model(prompts[c], use_cache=True), CACHE_FIELD) for c in contexts}
            for t in range(steps):
                for c in contexts if t % 2 == 0 else reversed(contexts):
                    start = time.perf_counter()
                    out = model(tokens[:, t : t + 1], cache=caches[c], use_cache=True)
                    times[c].append((time.perf_counter() - start) * 1e3)
                    caches[c] = getattr(out, CACHE_FIELD)
        return times

    for _ in range(warmup):
        run()
    times: dict[int, list[float]] = {c: [] for c in contexts}
    for _ in range(repeats):
        for c, t in run().items():
            times[c].extend(t)
    return {c: {"median": statistics.median(t), "mean": statistics.fmean(t)} for c, t in times.items()}
