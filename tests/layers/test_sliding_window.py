"""``sliding_window_attention`` over rows whose real tokens are a prefix (``valid``): each row's real
tokens and its new window are those of the row's real tokens read alone."""

import pytest
import torch

from ttt_mixer.modules.sliding_window import sliding_window_attention


def test_valid_rows_equal_each_rows_real_tokens_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 2, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    lengths = [4, 7]
    valid = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    _, window = sliding_window_attention(q[:, :3], k[:, :3], v[:, :3], None, 3)
    out, new_window = sliding_window_attention(q, k, v, window, 3, valid=valid)
    for row, length in enumerate(lengths):
        _, alone = sliding_window_attention(
            q[row : row + 1, :3], k[row : row + 1, :3], v[row : row + 1, :3], None, 3
        )
        expected, expected_window = sliding_window_attention(
            q[row : row + 1, :length], k[row : row + 1, :length], v[row : row + 1, :length], alone, 3
        )
        torch.testing.assert_close(out[row, :length], expected[0], rtol=0, atol=1e-12)
        for got, want in zip(new_window, expected_window, strict=True):
            torch.testing.assert_close(got[row], want[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="valid"):
        sliding_window_attention(
            q[:1], k[:1], v[:1], None, 3, cu_seqlens=torch.tensor([0, 7]), valid=valid[:1]
        )
