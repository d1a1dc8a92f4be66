"""The axes along which the TTT family's members differ (docs/math.md section 13), as one frozen spec.

The default spec is TTT itself (Sun et al. 2024): a linear inner model, the LayerNorm-fused
reconstruction loss, the dual-form order and a plain gradient step per mini-batch; ``ttt_spec`` gives
TTT-Linear and TTT-MLP. Titans and LaCT are points of the same space (``ttt_mixer.layers.ttt_family``
holds their presets).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

FAMILY_INNER_MODELS = ("linear", "mlp", "swiglu")
# the inner models of TTT itself (TTT-Linear, TTT-MLP), which the Triton kernels also cover
INNER_MODELS = ("linear", "mlp")
INNER_LOSSES = ("reconstruction", "dot_product")
# "dual": each token reads the weights updated by its mini-batch up to itself (TTT, Titans);
# "apply_then_update": a mini-batch's tokens read the weights before its update (LaCT)
UPDATE_ORDERS = ("dual", "apply_then_update")


@dataclass(frozen=True)
class FamilySpec:
    """One member of the TTT family.

    inner_model: ``"linear"``, ``"mlp"`` (GELU, hidden 4d) or ``"swiglu"`` (LaCT's fast weights,
        hidden d, no biases). loss: ``"reconstruction"`` (1/2 ||f(k) - v||^2, LayerNorm-fused when the
        op is given an inner LayerNorm) or ``"dot_product"`` (-<f(k), v>). order: see UPDATE_ORDERS.
    momentum / forgetting: data-dependent momentum on the update and decay of the weights (Titans;
        per token in the dual order, per mini-batch with the gates' mean in the other). weight_norm:
        every column of the weights rescaled to its initial norm after each update; muon: the update
        orthogonalised by Newton-Schulz (LaCT); both act on a whole mini-batch's update, so they need
        ``order="apply_then_update"``. mini_batch_size: tokens per update, 1 to thousands.
    """

    inner_model: str = "linear"
    loss: str = "reconstruction"
    order: str = "dual"
    mini_batch_size: int = 16
    momentum: bool = False
    forgetting: bool = False
    weight_norm: bool = False
    muon: bool = False

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("inner_model", self.inner_model, FAMILY_INNER_MODELS),
            ("loss", self.loss, INNER_LOSSES),
            ("order", self.order, UPDATE_ORDERS),
        ):
            if value not in choices:
                raise ValueError(f"FamilySpec.{name} must be one of {choices}, got {value!r}")
        size = self.mini_batch_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"FamilySpec.mini_batch_size must be an int >= 1, got {size!r}")
        for name in ("momentum", "forgetting", "weight_norm", "muon"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"FamilySpec.{name} must be True or False, got {getattr(self, name)!r}")
        if (self.weight_norm or self.muon) and self.order != "apply_then_update":
            # both are non-linear in the mini-batch's gradient sum: a token inside a mini-batch
            # cannot read a partial update in the dual form
            raise ValueError("FamilySpec: weight_norm and muon need order='apply_then_update'")

    @property
    def num_matrices(self) -> int:
        """Weight matrices of the inner model (a linear layer's bias rides in its matrix)."""
        return {"linear": 1, "mlp": 2, "swiglu": 3}[self.inner_model]

    @property
    def has_gate_sums(self) -> bool:
        """Whether the state sums the gates of the current mini-batch (their mean acts at its end)."""
        return self.order == "apply_then_update" and (self.momentum or self.forgetting)

    @property
    def has_bias(self) -> bool:
        """Whether every matrix carries a bias (linear and MLP layers; SwiGLU's take none)."""
        return self.inner_model != "swiglu"

    def is_plain_ttt(self) -> bool:
        """TTT-Linear or TTT-MLP without any other axis: the specs the Triton kernels cover."""
        return (
            self.inner_model in INNER_MODELS
            and self.loss == "reconstruction"
            and self.order == "dual"
            and not (self.momentum or self.forgetting or self.weight_norm or self.muon)
        )


@functools.lru_cache(maxsize=64)
def ttt_spec(inner_model: str, mini_batch_size: int) -> FamilySpec:
    """TTT-Linear (``"linear"``) or TTT-MLP (``"mlp"``) with mini-batches of ``mini_batch_size``."""
    if inner_model not in INNER_MODELS:
        raise ValueError(f"inner_model must be one of {INNER_MODELS}, got {inner_model!r}")
    return FamilySpec(inner_model, mini_batch_size=mini_batch_size)
