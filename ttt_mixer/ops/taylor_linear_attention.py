"""Linear attention with Based's second-order Taylor feature map (docs/math.md, section 15): the feature
map, causal normalised linear attention in blocks from a state (Based), and prefix linear attention
(JRT-RNN: an encoder state over the first ``prefix_length`` tokens, read by every query), with its
token-by-token reference. Pure functions on fla's [B, T, H, d] layout, in at least float32
(float64 stays float64)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# tokens per block of the blocked path: quadratic inside a block, through the state across blocks
BLOCK_SIZE = 64


class PrefixState(NamedTuple):
    """The state of prefix linear attention after some tokens of each sequence: ``kv`` [B, H, F, dv]
    and ``key_sum`` [B, H, F], the encoder's and the decoder's sums together, and ``seen`` [B] (int64),
    how many real tokens each sequence has had."""

    kv: torch.Tensor
    key_sum: torch.Tensor
    seen: torch.Tensor


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """fla's TaylorFeatureMap in at least float32, [..., f] -> [..., 1 + f + f(f+1)/2]:
    (1, x / f^(1/4), x_i^2 / sqrt(2f), x_i x_j / sqrt(f) for i < j), so that
    phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(f). Computed here without fla's activation
    checkpointing, which PyTorch warns about."""
    x = _at_least_float32(x)
    dim = x.shape[-1]
    outer = x[..., :, None] * x[..., None, :]
    upper = torch.triu_indices(dim, dim, 1, device=x.device)
    diagonal = torch.diagonal(outer, dim1=-2, dim2=-1)
    return torch.cat(
        [
            torch.ones_like(x[..., :1]),
            x / math.sqrt(math.sqrt(dim)),
            diagonal / (math.sqrt(dim) * math.sqrt(2)),
            outer[..., upper[0], upper[1]] / math.sqrt(dim),
        ],
        dim=-1,
    )


def taylor_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Causal normalised linear attention with the Taylor feature map, continuing from ``state``:
    q, k [B, T, H, f], v [B, T, H, dv], mask [B, T] bool (None: all real), state (S [B, H, F, dv],
    z [B, H, F]) or None (zeros) -> (o [B, T, H, dv] in at least float32, (S, z) after the last
    token), with o_t = phi(q_t).(S + sum_{s<=t} phi(k_s) v_s^T) / (phi(q_t).(z + sum_{s<=t} phi(k_s)) + eps)
    over real s. In blocks: within a block the weights phi(q).phi(k) = 1 + s + s^2/2 as a matrix, from
    earlier blocks through the state."""
    batch_size, q_len, num_heads, head_dim = q.shape
    phi_q, phi_k = taylor_features(q), taylor_features(k)
    q, k, v = _at_least_float32(q) / math.sqrt(head_dim), _at_least_float32(k), _at_least_float32(v)
    if state is None:
        num_features = phi_k.shape[-1]
        kv = v.new_zeros(batch_size, num_heads, num_features, v.shape[-1])
        key_sum = v.new_zeros(batch_size, num_heads, num_features)
    else:
        kv, key_sum = state
    if mask is not None:
        phi_k = torch.where(mask[..., None, None], phi_k, 0)
    outputs = []
    for start in range(0, q_len, BLOCK_SIZE):
        end = min(start + BLOCK_SIZE, q_len)
        s = torch.einsum("bthf,bshf->bhts", q[:, start:end], k[:, start:end])
        weights = (1 + s + s.square() / 2).tril()
        if mask is not None:
            weights = torch.where(mask[:, None, None, start:end], weights, 0)
        numerator = torch.einsum("bhts,bshd->bthd", weights, v[:, start:end]) + torch.einsum(
            "bthf,bhfd->bthd", phi_q[:, start:end], kv
        )
        denominator = weights.sum(-1).transpose(1, 2) + torch.einsum(
            "bthf,bhf->bth", phi_q[:, start:end], key_sum
        )
        outputs.append(numerator / (denominator[..., None] + eps))
        kv = kv + torch.einsum("bshf,bshd->bhfd", phi_k[:, start:end], v[:, start:end])
        key_sum = key_sum + phi_k[:, start:end].sum(1)
    return torch.cat(outputs, dim=1), (kv, key_sum)


def check_prefix_length(prefix_length: object) -> int:
    """``prefix_length`` as an int >= 1, else TypeError / ValueError naming it."""
    if isinstance(prefix_length, bool) or not isinstance(prefix_length, int):
        raise TypeError(f"prefix_length must be an int, got {type(prefix_length).__name__}")
    if prefix_length < 1:
        raise ValueError(f"prefix_length must be >= 1, got {prefix_length}")
    return prefix_length


def prefix_positions(mask: torch.Tensor | None, seen: torch.Tensor, q_len: int) -> torch.Tensor:
    """Each token's index among its sequence's real tokens ([B, T] int64), counting the ``seen``
    [B] real tokens before this call; a padding token gets its next real token's index."""
    real = (
        torch.ones(seen.shape[0], q_len, dtype=torch.long, device=seen.device)
        if mask is None
        else mask.long()
    )
    return seen[:, None] + real.cumsum(1) - real


def prefix_taylor_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_enc: torch.Tensor,
    v_enc: torch.Tensor,
    prefix_length: int,
    mask: torch.Tensor | None = None,
    state: PrefixState | None = None,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, PrefixState]:
    """Prefix linear attention (JRT-RNN), blocked, continuing from ``state``: q, k, k_enc [B, T, H, f],
    v, v_enc [B, T, H, dv], mask [B, T] bool (None: all real) -> (o [B, T, H, dv] in at least float32,
    the state after the last token; padding outputs 0). With P the first ``prefix_length`` real tokens of a sequence,

        o_t = phi(q_t).(E + D_t) / (phi(q_t).(e + d_t) + eps),
        E = sum_{s in P} phi(k_enc_s) v_enc_s^T, e = sum_{s in P} phi(k_enc_s),
        D_t = sum_{s<=t} phi(k_s) v_s^T, d_t = sum_{s<=t} phi(k_s) (real s),

    so every query, one inside the prefix too, reads the whole prefix's encoder state. A cached
    sequence continues exactly once its prefix is complete; continuing one that stopped inside its
    prefix (0 < seen < prefix_length) is refused with a ValueError, since the outputs already given
    for its prefix tokens lacked the prefix's later tokens. A sequence that ends inside its prefix
    has the tokens it has as its prefix."""
    check_prefix_length(prefix_length)
    batch_size, q_len = q.shape[:2]
    v, v_enc = _at_least_float32(v), _at_least_float32(v_enc)
    real = torch.ones(batch_size, q_len, dtype=torch.bool, device=q.device) if mask is None else mask
    if state is None:
        seen = torch.zeros(batch_size, dtype=torch.long, device=q.device)
        decoder_state = None
    else:
        seen = state.seen
        split = (seen > 0) & (seen < prefix_length) & real.any(1)
        if split.any():
            row = int(split.nonzero()[0, 0])
            raise ValueError(
                f"cannot continue a cached sequence inside its prefix: sequence {row} has "
                f"{int(seen[row])} of its prefix_length={prefix_length} prefix tokens cached, and the "
                "outputs given for them did not read the rest of the prefix; pass at least "
                "prefix_length tokens (or the whole sequence) in the first call"
            )
        decoder_state = (state.kv, state.key_sum)
    in_prefix = real & (prefix_positions(mask, seen, q_len) < prefix_length)
    phi_k_enc = torch.where(in_prefix[..., None, None], taylor_features(k_enc), 0)
    encoder_kv = torch.einsum("bshf,bshd->bhfd", phi_k_enc, v_enc)
    encoder_key_sum = phi_k_enc.sum(1)
    if decoder_state is not None:
        encoder_kv, encoder_key_sum = decoder_state[0] + encoder_kv, decoder_state[1] + encoder_key_sum
    o, (kv, key_sum) = taylor_linear_attention(q, k, v, mask, (encoder_kv, encoder_key_sum), eps)
    # a padding token reads nothing, though the encoder state is in every token's starting state
    o = torch.where(real[..., None, None], o, 0)
    return o, PrefixState(kv, key_sum, seen + real.long().sum(1))


def prefix_taylor_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_enc: torch.Tensor,
    v_enc: torch.Tensor,
    prefix_length: int,
    mask: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """``prefix_taylor_linear_attention`` of whole sequences written from the math, token by token: per
    sequence, the encoder sums over its first ``prefix_length`` real tokens, then for each real token
    in order the decoder sums updated and the output read; padding outputs 0. Computes in the inputs'
    dtype (float64 for the tests)."""
    check_prefix_length(prefix_length)
    batch_size, q_len = q.shape[:2]
    o = v.new_zeros(v.shape)
    for row in range(batch_size):
        real = [t for t in range(q_len) if mask is None or bool(mask[row, t])]
        phi_k_enc = taylor_features(k_enc[row, real[:prefix_length]]).to(q.dtype)
        encoder_kv = torch.einsum("shf,shd->hfd", phi_k_enc, v_enc[row, real[:prefix_length]])
        encoder_key_sum = phi_k_enc.sum(0)
        decoder_kv, decoder_key_sum = torch.zeros_like(encoder_kv), torch.zeros_like(encoder_key_sum)
        for t in real:
            phi_q, phi_k = taylor_features(q[row, t]).to(q.dtype), taylor_features(k[row, t]).to(q.dtype)
            decoder_kv = decoder_kv + phi_k[:, :, None] * v[row, t, :, None, :]
            decoder_key_sum = decoder_key_sum + phi_k
            numerator = torch.einsum("hf,hfd->hd", phi_q, encoder_kv + decoder_kv)
            denominator = torch.einsum("hf,hf->h", phi_q, encoder_key_sum + decoder_key_sum)
            o[row, t] = numerator / (denominator[:, None] + eps)
    return o
