"""One decoding step of TTT for a batch of sequences, each at its own position in its mini-batch
(docs/math.md section 6): G_i at W; S += lr_i G_i; W_bar = W - tau_i S; output f(XQ_i; W_bar); at the end
of a mini-batch W <- W_bar and S <- 0. Its cost does not depend on how many tokens came before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttt_mixer.ops.ttt.checks import check_decode_step, check_inputs
from ttt_mixer.ops.ttt.inner import (
    get_inner_model,
    inner_forward,
    inner_gradients,
    inner_output,
    loss_offset,
    token_scale,
    with_ones,
)
from ttt_mixer.ops.ttt.state import initial_state as make_initial_state
from ttt_mixer.ops.ttt.state import join_state, split_state


def ttt_step(
    inner_model: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_offset: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    params: Sequence[torch.Tensor],
    initial_state: tuple[torch.Tensor, ...] | None = None,
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Read one token per sequence. Arguments as for ``ttt_chunk``, with T = 1 for a batch of rows,
    or, packed, ``cu_seqlens`` whose sequences hold one token or none (a sequence without a token
    keeps its state)."""
    inner = get_inner_model(inner_model)
    params = list(params)
    num_sequences = check_inputs(
        inner, q, k, v, lr, token_offset, ln_weight, ln_bias, params, initial_state, cu_seqlens, eps
    )
    check_decode_step(q, cu_seqlens)
    B, T, H, d = q.shape
    lengths = None if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).to(q.device)
    b = token_offset.shape[0]
    dtype = torch.promote_types(q.dtype, torch.float32)
    if initial_state is None:
        initial_state = make_initial_state(inner, [p.to(dtype) for p in params], num_sequences)
    position, weights, sums = split_state(initial_state)
    weights = [w.to(dtype) for w in weights]
    sums = [s.to(dtype) for s in sums]

    def per_sequence(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, ...] -> [N, H, 1, ...], a zero row for a sequence without a token
        x = x.to(dtype).reshape(B * T, *x.shape[2:])
        if lengths is None:
            return x.unsqueeze(2)
        index = torch.where(lengths > 0, cu_seqlens[:-1].to(q.device), B * T)
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[index].unsqueeze(2)

    qn, kn, vn, lrn = (per_sequence(t) for t in (q, k, v, lr))
    lnw, lnb = (
        (None, None) if ln_weight is None else (ln_weight.to(dtype)[:, None], ln_bias.to(dtype)[:, None])
    )
    x, g = inner_gradients(inner, with_ones(kn), loss_offset(kn, vn, lnw, lnb), weights, lnw, eps)
    sums_new = [
        s + (lrn[..., None] * xl).transpose(-1, -2) @ gl for s, xl, gl in zip(sums, x, g, strict=True)
    ]
    tau_i = token_scale(token_offset.to(dtype))[position][:, None, None, None]
    weights_bar = [w - tau_i * s for w, s in zip(weights, sums_new, strict=True)]
    out = inner_output(qn, inner_forward(inner, qn, weights_bar), lnw, lnb, eps)
    o = out.squeeze(2)
    if lengths is not None:
        # tokens are packed in sequence order, so the sequences that hold one give the output rows
        o = o[lengths > 0]
    o = o.reshape(B, T, H, d).to(q.dtype)

    if not output_final_state:
        return o, None
    boundary = (position + 1 == b)[:, None, None, None]
    new_weights = [torch.where(boundary, wb, w) for wb, w in zip(weights_bar, weights, strict=True)]
    new_sums = [torch.where(boundary, 0.0, s) for s in sums_new]
    new_position = (position + 1) % b
    if lengths is not None:
        has = lengths > 0
        keep = has[:, None, None, None]
        new_weights = [torch.where(keep, nw, w) for nw, w in zip(new_weights, weights, strict=True)]
        new_sums = [torch.where(keep, ns, s) for ns, s in zip(new_sums, sums, strict=True)]
        new_position = torch.where(has, new_position, position)
    return o, join_state(new_position, new_weights, new_sums)
