"""Set disjointness in the recall gap (``ttt-mixer recall-gap --task set_disjointness``): its shapes,
a preset's recipe for it and the word-level vocabulary (the training data: ``data``).

Documents come from the evaluation task's own construction (:mod:`ttt_mixer.eval_tasks.set_disjointness`:
two sets sharing one symbol, ``A | B =``, the answer the shared symbol), so a training sequence is
exactly the token sequence lm-eval reads for a ``ttt_set_disjointness`` context followed by its
answer. The loss is on the answer alone. Every training length is trained twice, once with the short
set first and once with the long set first (``FIRST_FRACTIONS``), since the order decides what a
recurrent state must keep; each run is evaluated at both orders. Training draws from its own seed,
not the task's, as MQAR's training does (``data``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ttt_mixer.eval_tasks import set_disjointness as task
from ttt_mixer.recall_gap.vocabulary import VOCAB

# the first set's share of the symbols: the short set first, then the long set first (the task's
# default 0.25 and its mirror)
FIRST_FRACTIONS = (0.25, 0.75)
# the most symbols two sets can hold: the task's symbols, one of them in both sets
MAX_LENGTH = len(task.SYMBOLS) + 1
# what task.prompt writes between the two sets and after them, each one token
SEPARATORS = ("|", "=")
SET_DISJOINTNESS_VOCAB = {**VOCAB, **{token: len(VOCAB) + i for i, token in enumerate(SEPARATORS)}}


@dataclass(frozen=True, order=True)
class SetDisjointnessShape:
    """A set-disjointness shape: ``seq_len`` symbols in the two sets together (the task's
    ``sd_lengths``, L) and the first set's share of them (``sd_first_fraction``)."""

    seq_len: int
    first_fraction: float

    task: ClassVar[str] = "set_disjointness"
    title: ClassVar[str] = "set disjointness"
    read_twice: ClassVar[str] = "the two sets"  # what the JRT prompt repeats
    dashed: ClassVar[str] = "the other set order"  # the plot's dashed line
    lm_eval_task: ClassVar[str] = "ttt_set_disjointness"
    scoring: ClassVar[str] = (
        "acc: the shared symbol is the likeliest of the document's symbols; chance 1/(L-1)"
    )

    def __post_init__(self) -> None:
        if not 3 <= self.seq_len <= MAX_LENGTH:
            raise ValueError(
                f"a set-disjointness length must be in [3, {MAX_LENGTH}] (two sets of distinct symbols "
                f"sharing one), got {self.seq_len}"
            )
        if not 0 < self.first_fraction < 1:
            raise ValueError(f"first_fraction must be in (0, 1), got {self.first_fraction}")

    @property
    def label(self) -> str:
        return f"L{self.seq_len}-first{self.first_fraction:g}"

    @property
    def header(self) -> str:
        return f"acc L={self.seq_len} first={self.first_fraction:g}"

    @property
    def series(self) -> float:
        """What sets the evaluation shapes of one length apart (the tables group columns by it)."""
        return self.first_fraction

    def on_dashed_line(self, other: SetDisjointnessShape) -> bool:
        """Whether the plot draws ``other`` on this shape's dashed line: the other set order."""
        return other.first_fraction != self.first_fraction

    @property
    def longest_tokens(self) -> int:
        """Tokens of the JRT prompt's document and its answer: ``A | B | A | B =`` (the symbols twice,
        four separators) and the answer."""
        return 2 * self.seq_len + 5


@dataclass(frozen=True)
class SetDisjointnessRecipe:
    """What a preset trains and evaluates with ``--task set_disjointness`` in place of its MQAR shapes,
    steps, batch size and evaluation samples (the rest of the preset is the same)."""

    lengths: tuple[int, ...]  # training lengths L, each trained with every order of FIRST_FRACTIONS
    steps: int
    batch_size: int
    eval_samples: int  # documents per evaluation shape (one answer each)

    def train_shapes(self, lengths: Sequence[int] | None = None) -> tuple[SetDisjointnessShape, ...]:
        """Every training shape: each of ``lengths`` (default: the recipe's) in every set order."""
        return tuple(
            SetDisjointnessShape(length, fraction)
            for length in (self.lengths if lengths is None else lengths)
            for fraction in FIRST_FRACTIONS
        )


def eval_shapes(
    train: SetDisjointnessShape, length_factors: Sequence[int]
) -> tuple[SetDisjointnessShape, ...]:
    """The training length times every factor, in every set order; sorted."""
    return tuple(
        sorted(
            SetDisjointnessShape(train.seq_len * factor, fraction)
            for factor in set(length_factors)
            for fraction in FIRST_FRACTIONS
        )
    )
