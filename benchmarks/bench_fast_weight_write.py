"""How far one write moves the fast-weight memory of Titans and LaCT at init, per inner base rate,
at the recall gap's CPU sizes (width 64, one head, mini-batches of 16; docs/recall_gap.md, "Titans
and LaCT in the CPU preset").

Per trial a fresh layer (``TTTFamilyLayer``, its own init) takes 32 tokens: the first ``--pairs``
write random unit keys and values (every other token's rate is 0), and the second mini-batch's first
``--pairs`` tokens query those keys. The gates sit where an untrained layer puts them (rates at
their base, momentum 0.5, Titans' forgetting sigmoid(-5)). Printed per base rate, as means over the
trials: the read-out's change from the unwritten memory's, relative to that read-out (how much the
memory holds after the writes), and its cosine with the written value (how well it holds it).

    python benchmarks/bench_fast_weight_write.py
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from ttt_mixer.arguments import positive_int
from ttt_mixer.layers.ttt_family import FORGET_BIAS_INIT, TTTFamilyLayer, l2_normalise

WIDTH, LENGTH, MINI_BATCH = 64, 32, 16
BASE_RATES = {"titans": (0.1, 1.0), "lact": (1e-3, 1e-2, 0.1, 1.0)}  # each preset's default first


def read_change(preset: str, base_lr: float, pairs: int) -> tuple[float, float]:
    """(|change of the read-out| / |unwritten read-out|, cosine of the change with the value),
    averaged over the queried keys, for one fresh layer."""
    window = {"window_size": MINI_BATCH} if preset == "lact" else {}
    layer = TTTFamilyLayer(WIDTH, 1, preset=preset, mini_batch_size=MINI_BATCH, base_lr=base_lr, **window)
    k = l2_normalise(torch.randn(1, LENGTH, 1, WIDTH))
    v = torch.randn(1, LENGTH, 1, WIDTH)
    v = F.silu(v) if preset == "lact" else v  # LaCT's values pass a SiLU, Titans' are the projection's
    q = torch.zeros_like(k)
    queries = slice(MINI_BATCH, MINI_BATCH + pairs)
    q[:, queries] = k[:, :pairs]
    writes = torch.zeros(1, LENGTH, 1)
    writes[:, :pairs] = base_lr
    momentum = torch.full((1, LENGTH, 1), 0.5)
    if preset == "titans":
        # lr = base_lr * sigmoid(x W + c) with c = 0 at init
        lr, forget = (
            writes * 0.5,
            torch.full((1, LENGTH, 1), torch.sigmoid(torch.tensor(FORGET_BIAS_INIT)).item()),
        )
    else:
        lr, forget = writes[..., None].expand(1, LENGTH, 1, 3).contiguous(), None
    with torch.no_grad():
        written, _ = layer.fast_weights(q, k, v, lr, momentum, forget, None, False, None)
        unwritten, _ = layer.fast_weights(q, k, v, torch.zeros_like(lr), momentum, forget, None, False, None)
    change, before = (written - unwritten)[0, queries, 0], unwritten[0, queries, 0]
    ratio = (change.norm(dim=-1) / before.norm(dim=-1)).mean().item()
    return ratio, F.cosine_similarity(change, v[0, :pairs, 0], dim=-1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=positive_int, default=4, help="keys written and queried (at most 16)")
    parser.add_argument("--trials", type=positive_int, default=20, help="fresh layers per base rate")
    args = parser.parse_args()
    if args.pairs > MINI_BATCH:
        parser.error(f"--pairs must be at most {MINI_BATCH}, got {args.pairs}")
    torch.manual_seed(0)
    for preset, rates in BASE_RATES.items():
        for base_lr in rates:
            results = [read_change(preset, base_lr, args.pairs) for _ in range(args.trials)]
            ratio = statistics.mean(r for r, _ in results)
            cosine = statistics.mean(c for _, c in results)
            print(
                f"{preset} base_lr {base_lr:g}: read-out change / unwritten read-out {ratio:.4f}, cosine with the value {cosine:.3f}"
            )


if __name__ == "__main__":
    main()
