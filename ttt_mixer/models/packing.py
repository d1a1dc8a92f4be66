"""Packed sequences in a causal LM's input, written once for every model of the project.

Several sequences packed into one row of batch size 1 (padding-free training) reach a model as
``cu_seqlens`` [N + 1] (fla's form), or as ``position_ids`` that restart at 0 where a sequence begins
(transformers' form: ``DataCollatorWithFlattening`` and its packed generation). ``packed_sequences``
checks both against each other, against the padding mask and against the cache, and returns the
``cu_seqlens`` that the layers run; ``PackedAsPadded`` runs packed sequences through layers that take
a padding mask instead (each sequence one row of a left-padded batch).
"""

from __future__ import annotations

import torch
from fla.layers.utils import get_unpad_indices_and_cu, repad_hidden_states, unpad_hidden_states
from fla.ops.utils import prepare_position_ids
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from ttt_mixer.layers.checks import padding_mask
from ttt_mixer.ops.ttt.checks import check_cu_seqlens


def packed_sequences(
    position_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    past_length: int,
    batch_size: int,
    q_len: int,
) -> torch.Tensor | None:
    """The offsets [N + 1] of the packed sequences of an input [batch_size, q_len], or None for a
    batch of rows. ``cu_seqlens`` as given, else derived from resets of ``position_ids`` to 0.

    ``position_ids`` [batch_size or 1, q_len], integers, are accepted when they say what the input
    already says, and refused (ValueError naming them) otherwise:
    - with no padding in ``attention_mask`` (which covers the cached and new tokens): each row counts
      on from the ``past_length`` cached tokens (past_length..past_length + q_len - 1), or, without a
      cache and in a batch of size 1, restarts at 0 where a packed sequence begins; with
      ``cu_seqlens``, each packed sequence counts from 0;
    - with padding: the mask says where each sequence begins, and the positions of a row's real
      tokens count up by one from one real token to the next (generate's position_ids do; a constant
      shift changes nothing for rotary attention, the only mixer that reads positions); packing is
      refused with padding, as ``cu_seqlens`` is."""
    padded = attention_mask is not None and padding_mask(attention_mask, batch_size, q_len) is not None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, batch_size, q_len, "input_ids / inputs_embeds")
        if padded:
            raise ValueError("give either cu_seqlens (packed input) or a padding attention_mask, not both")
    if position_ids is None:
        return cu_seqlens
    positions = checked_position_ids(position_ids, batch_size, q_len)
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        check_positions_of_real_tokens(positions, attention_mask[:, -q_len:].bool())
        return cu_seqlens
    if cu_seqlens is not None:
        if past_length:
            raise ValueError(
                "position_ids cannot be checked against cu_seqlens continuing a cache: leave position_ids "
                "out (cu_seqlens says where each packed sequence begins)"
            )
        expected = prepare_position_ids(cu_seqlens).to(positions)
        if not torch.equal(positions[0], expected):
            raise ValueError(
                f"position_ids disagree with cu_seqlens = {cu_seqlens.tolist()}: each packed sequence "
                f"counts from 0, {short(expected)}; got {short(positions[0])}"
            )
        return cu_seqlens
    expected = torch.arange(past_length, past_length + q_len, device=positions.device)
    if bool((positions == expected).all()):
        return None
    steps = positions.diff(dim=-1)
    restarts = bool((positions[:, 0] == 0).all() and ((steps == 1) | (positions[:, 1:] == 0)).all())
    if past_length == 0 and restarts:
        if batch_size != 1:
            raise ValueError(
                "position_ids that restart at 0 mark packed sequences, which take batch size 1 "
                f"(DataCollatorWithFlattening's form, as cu_seqlens does), got batch size {batch_size}"
            )
        (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(positions)
        return cu_seqlens
    row = int((positions != expected).any(-1).nonzero()[0])
    if past_length:
        rule = f"count on from the {past_length} cached tokens: {short(expected)}"
    else:
        rule = (
            f"count from 0: {short(expected)}, or, in a batch of size 1, restart at 0 where a packed "
            "sequence begins"
        )
    raise ValueError(f"position_ids of each row must {rule}; got {short(positions[row])} in row {row}")


def checked_position_ids(position_ids: object, batch_size: int, q_len: int) -> torch.Tensor:
    """``position_ids`` as [batch_size, q_len]; TypeError unless an integer tensor, ValueError unless
    [batch_size or 1, q_len]."""
    if (
        not isinstance(position_ids, torch.Tensor)
        or position_ids.is_floating_point()
        or position_ids.is_complex()
        or position_ids.dtype == torch.bool
    ):
        kind = position_ids.dtype if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise TypeError(f"position_ids must be an integer tensor [batch_size, seq_len], got {kind}")
    if (
        position_ids.dim() != 2
        or position_ids.shape[0] not in (1, batch_size)
        or position_ids.shape[1] != q_len
    ):
        raise ValueError(
            f"position_ids must have shape [batch_size, seq_len] = [{batch_size}, {q_len}] (or [1, {q_len}]), "
            f"got {list(position_ids.shape)}"
        )
    return position_ids.expand(batch_size, -1)


def check_positions_of_real_tokens(positions: torch.Tensor, real: torch.Tensor) -> None:
    """ValueError unless in each row the positions of the real tokens (``real`` [B, T], bool) are >= 0
    and count up by one from one real token to the next (padding's positions are not read)."""
    # a position minus the real tokens before it is the same for every real token of a row
    shift = positions - real.cumsum(-1)
    large = torch.iinfo(shift.dtype).max
    lowest = shift.masked_fill(~real, large).min(-1).values
    highest = shift.masked_fill(~real, -large).max(-1).values
    negative = (positions < 0) & real
    if bool(negative.any()):
        row = int(negative.any(-1).nonzero()[0])
        raise ValueError(
            f"position_ids must be >= 0 at real tokens, got {short(positions[row][real[row]])} in row {row}"
        )
    bad = (real.any(-1) & (lowest != highest)).nonzero().flatten().tolist()
    if bad:
        row = bad[0]
        raise ValueError(
            "position_ids of a padded batch must count up by one from one real token to the next (the "
            "attention_mask says where each sequence begins; packing by position_ids resets needs a batch "
            f"without padding); got {short(positions[row][real[row]])} at the real tokens of row {row}"
        )


def short(values: torch.Tensor, limit: int = 12) -> str:
    """The values of a 1-D tensor as a list, shortened for a message."""
    shown = values.tolist()
    if len(shown) <= limit:
        return str(shown)
    return f"[{', '.join(map(str, shown[:limit]))}, ...] ({len(shown)} values)"


class PackedAsPadded:
    """Packed sequences (``cu_seqlens`` over an input of batch size 1) as a left-padded batch of one
    row per sequence and its padding mask, for layers that take a mask: ``pad`` [1, T, ...] ->
    [N, L, ...] (L the longest sequence), ``unpack`` back. Every mixer skips padding exactly, so the
    outputs are the packed ones; the padding costs N * L - T positions of work."""

    def __init__(self, cu_seqlens: torch.Tensor) -> None:
        lengths = cu_seqlens.diff().long()
        self.num_sequences, self.length = lengths.numel(), max(int(lengths.max()), 1)
        columns = torch.arange(self.length, device=cu_seqlens.device)
        self.attention_mask = (columns >= self.length - lengths[:, None]).long()
        self.indices, _ = get_unpad_indices_and_cu(self.attention_mask, self.length)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return repad_hidden_states(x, self.indices, self.num_sequences, self.length)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return unpad_hidden_states(x, None, self.attention_mask, self.length)[0]
