"""The two presets of ``ttt-mixer recall-gap``: the CPU default and the GPU Zoology sweep.

A preset names the mixers, the backbone, the model sizes, the MQAR shapes trained on, the step
budget (the same for every mixer), the learning rates and the evaluation. Every model of a preset is
one backbone (``BACKBONES``: token embedding, RMSNorms, untied output head, with or without SwiGLU
MLPs) with the mixer swapped into every layer by :func:`ttt_mixer.adapters.swap_mixer`, so the
mixers differ in nothing else.

CPU default (each choice's measurements: docs/recall_gap.md): the Mamba backbone (each layer the mixer alone: with the
Llama block's MLP after the mixer, Mamba-2 stayed on the unigram plateau, and so did GLA with small
batches; docs/recall_gap.md), 2 layers of width 64 and one head (a single 64-wide attention
head, as Zoology's attention baseline), 2000 steps of 16 sequences of 32 symbols with 4 key-value
pairs (small steps run faster per sequence on a CPU than steps of 64, and Mamba-2 needs that many
updates). Evaluation at the training length and at
2x and 4x it, once with the training's 4 pairs (length alone) and once with the pairs scaled with
the length (8 at 64, 16 at 128: the same density, more to remember), which is where states of a
fixed size fall behind.

Learning rates, per mixer: the best of a sweep at the training shape; the measured sweep is in
docs/recall_gap.md. Mamba and Longhorn, which stalled there with their authors' init, get a start of
their own in the CPU preset (``CPU_MIXER_OPTIONS``) and a rate from a sweep over three seeds with it.

GPU Zoology sweep: Zoology's MQAR grid (Arora et al. 2023, *Zoology*; the Based paper's Figure 2) in
the Llama backbone, as Zoology trains attention and Based: widths 64 to 512, sequence lengths 64 to
512 with 4 to 64 pairs, every (mixer, width, shape) trained at four learning rates
(``np.logspace(-4, -2, 4)``) and reported at its best, then plotted as accuracy against recurrent
state size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

from ttt_mixer.eval_tasks import recall
from ttt_mixer.recall_gap.set_disjointness import SetDisjointnessRecipe, SetDisjointnessShape, eval_shapes

# the block of every layer of a run's model (swap_mixer's two backbones), as the report names it
BACKBONES = {
    "llama": "Llama backbone (each layer: the mixer, then a SwiGLU MLP)",
    # Mamba's block, which Zoology also gives its Mamba
    "mamba": "Mamba backbone (each layer: the mixer alone, no MLP)",
}


def check_backbone(backbone: str) -> None:
    """A ValueError naming the choices unless ``backbone`` is one of ``BACKBONES``."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}")


MAX_KV_PAIRS = len(recall.MQAR_KEYS)


@dataclass(frozen=True, order=True)
class MQARShape:
    """An MQAR task shape: sequence length in symbols and key-value pairs per sequence."""

    seq_len: int
    num_kv_pairs: int

    task: ClassVar[str] = "mqar"
    title: ClassVar[str] = "MQAR"
    read_twice: ClassVar[str] = "the key-value pairs"  # what the JRT prompt repeats
    dashed: ClassVar[str] = "key-value pairs scaled with the length"  # the plot's dashed line
    lm_eval_task: ClassVar[str] = "ttt_mqar"
    scoring: ClassVar[str] = "acc: the gold value is the likeliest of the sequence's values; chance 1/kv"

    def __post_init__(self) -> None:
        if not 1 <= self.num_kv_pairs <= MAX_KV_PAIRS:
            raise ValueError(f"num_kv_pairs must be in [1, {MAX_KV_PAIRS}], got {self.num_kv_pairs}")
        if self.seq_len < recall.mqar_min_length(self.num_kv_pairs):
            raise ValueError(
                f"seq_len {self.seq_len} is below 4 * num_kv_pairs = "
                f"{recall.mqar_min_length(self.num_kv_pairs)}: too short for {self.num_kv_pairs} pairs"
            )

    @property
    def label(self) -> str:
        return f"L{self.seq_len}-kv{self.num_kv_pairs}"

    @property
    def header(self) -> str:
        return f"acc L={self.seq_len} kv={self.num_kv_pairs}"

    @property
    def series(self) -> int:
        """What sets the evaluation shapes of one length apart (the tables group columns by it)."""
        return self.num_kv_pairs

    def on_dashed_line(self, other: MQARShape) -> bool:
        """Whether the plot draws ``other`` on this shape's dashed line: the same density of pairs."""
        return other.num_kv_pairs * self.seq_len == self.num_kv_pairs * other.seq_len

    @property
    def longest_tokens(self) -> int:
        """Tokens of the JRT prompt's sequence: the pairs given once more before it."""
        return self.seq_len + 2 * self.num_kv_pairs


TrainShape = MQARShape | SetDisjointnessShape
TASKS = (MQARShape.task, SetDisjointnessShape.task)
TASK_TITLES = {shape.task: shape.title for shape in (MQARShape, SetDisjointnessShape)}


@dataclass(frozen=True)
class Preset:
    """Everything a run needs besides the output folder; see the module docstring."""

    name: str
    description: str
    mixers: tuple[str, ...]
    widths: tuple[int, ...]
    num_layers: int
    num_heads: int
    train_shapes: tuple[TrainShape, ...]  # of one task: MQAR (a preset's own) or set disjointness
    steps: int
    # per-device batch size times devices; a mapping from sequence length picks it per shape
    batch_size: int | Mapping[int, int]
    # one rate per mixer, or a sweep: every rate for every mixer, best kept (Zoology's protocol)
    learning_rates: Mapping[str, float] | tuple[float, ...]
    length_factors: tuple[int, ...] = (1, 2, 4)
    eval_samples: int = 25  # MQAR sequences per evaluation shape (each gives num_kv_pairs documents)
    min_attention_accuracy: float = 0.9  # at the training shape; below it training is broken
    # at the training shape; the report marks trained mixers below it as not learned
    learned_accuracy: float = 0.9
    mixer_options: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    backbone: str = "llama"  # one of BACKBONES
    # what --task set_disjointness trains and evaluates in place of the MQAR shapes
    set_disjointness: SetDisjointnessRecipe | None = None

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        tasks = {shape.task for shape in self.train_shapes}
        if len(tasks) > 1:
            raise ValueError(f"train_shapes must be of one task, got shapes of {sorted(tasks)}")

    @property
    def task(self) -> str:
        return self.train_shapes[0].task

    def for_task(self, task: str) -> Preset:
        """The preset for ``task`` (one of ``TASKS``): itself for MQAR, its set-disjointness recipe's
        shapes, steps, batch size and evaluation samples for set disjointness."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        if task == MQARShape.task:
            return self
        recipe = self.set_disjointness
        if recipe is None:
            raise ValueError(f"preset {self.name} has no set-disjointness recipe")
        return replace(
            self,
            train_shapes=recipe.train_shapes(),
            steps=recipe.steps,
            batch_size=recipe.batch_size,
            eval_samples=recipe.eval_samples,
        )

    def batch_size_for(self, seq_len: int) -> int:
        if isinstance(self.batch_size, int):
            return self.batch_size
        return self.batch_size[max(k for k in self.batch_size if k <= seq_len)]

    def learning_rates_for(self, mixer: str) -> tuple[float, ...]:
        if isinstance(self.learning_rates, tuple):
            return self.learning_rates
        return (self.learning_rates[mixer],)

    def eval_shapes(self, train: TrainShape) -> tuple[TrainShape, ...]:
        """MQAR: the training shape at every length factor, with the training's pairs and with the
        pairs scaled like the length (capped at the number of keys); set disjointness: the training
        length at every factor in every set order (``set_disjointness.eval_shapes``). Sorted, without
        repeats."""
        if isinstance(train, SetDisjointnessShape):
            return eval_shapes(train, self.length_factors)
        shapes = {MQARShape(train.seq_len * f, train.num_kv_pairs) for f in self.length_factors}
        shapes |= {
            MQARShape(train.seq_len * f, min(train.num_kv_pairs * f, MAX_KV_PAIRS))
            for f in self.length_factors
        }
        return tuple(sorted(shapes))


# A short convolution lets a recurrent layer bind a key to the value after it within one layer
# (Zoology's finding). Mamba, Mamba-2, Longhorn and Gated DeltaNet have theirs by default; TTT, GLA
# and Based get theirs here (for TTT its Mamba-backbone form; Based's, as in Zoology's Based layers,
# which mix a short convolution into every layer): without it TTT, GLA and Based fell far short in the
# CPU budget (docs/recall_gap.md has the runs).
# (fla layers call it use_short_conv; TTT calls its form share_qk)
TTT_SHORT_CONV = {"share_qk": True}
SHORT_CONV = {"use_short_conv": True}
# LaCT's chunks and window are 2048 tokens, far beyond MQAR's lengths: scaled down so that its fast
# weights update within a training sequence and its window covers half of it, its fast weights' base
# rate scaled up with the chunk (1e-3 x 128 ~ 0.1: an update sums 128 times fewer tokens), and its q,
# k, v convolved as the other recurrent layers' are: without the convolution it did not learn
# (docs/recall_gap.md, "LaCT with a short convolution")
LACT_RECALL = {"mini_batch_size": 16, "window_size": 16, "base_lr": 0.1, "use_short_conv": True}
# Titans' memory as k + LN(MLP(k)), TTT-MLP's form and the public titans-pytorch's default: with the
# bare MLP it did not learn the training shape at any outer rate (docs/recall_gap.md, "Titans with the
# memory's residual and LayerNorm")
TITANS_MEMORY = {"memory_residual_norm": True}
# transformers' Mamba mixer takes its init range from its config, which in a Mamba backbone is the
# backbone's (0.02 here): transformers' own 0.1, as Mamba-2's config has it
MAMBA_INIT = {"initializer_range": 0.1}
# The CPU budget's start for Mamba and Longhorn, the two mixers without a norm on their output: with
# their authors' init they stalled on a plateau in this budget. At init their skip D x (D = 1) is
# orders of magnitude above the scan's output (docs/recall_gap.md), so the layer starts as a per-token map and the
# loss settles on per-token answers before the state's path carries anything; D starts at 0 here
# (still trained). Mamba's S4D-real decays also forget most of its state within a few tokens, and
# Longhorn's state path starts near zero under the backbone's N(0, 0.02) with every token writing
# at rate 1/2: Mamba's decays start at -1 (as Mamba-2's single head) with dt in [0.01, 0.1] and its
# projections at N(0, 0.05), Longhorn's projections at N(0, 0.1) with its rates near sigmoid(-3), and
# both get a full-rank dt projection (docs/recall_gap.md).
MAMBA_CPU_START = {
    "initializer_range": 0.05,
    "A_init": 1.0,
    "D_init": 0.0,
    "time_step_rank": 64,
    "time_step_min": 0.01,
    "time_step_max": 0.1,
}
LONGHORN_CPU_START = {"initializer_range": 0.1, "dt_bias_init": -3.0, "D_init": 0.0, "dt_rank": 64}


@dataclass(frozen=True)
class MixerRecipe:
    """What the recall gap trains one row with: a mixer of ``ttt_mixer.adapters``' registry
    (``RECALL_GAP_MIXERS``: ``options`` are ``swap_mixer``'s), or a whole model of its own
    (``RECALL_GAP_MODELS``: ``options`` are its config's fields beyond the preset's sizes)."""

    cpu_learning_rate: float  # the CPU preset's (how each was chosen: at ``CPU`` below)
    # seconds per training step relative to attention's on the CPU preset, to start the longest runs
    # first; where each figure was measured: docs/recall_gap.md, "Relative training cost on CPU"
    relative_cpu_cost: float
    in_cpu_default: bool  # among the CPU preset's mixers (its 10-minute budget)
    options: Mapping[str, object] = field(default_factory=dict)  # swap_mixer options, every preset
    cpu_options: Mapping[str, object] | None = None  # the CPU preset's, where they differ from options
    description: str | None = None  # a model row's, for the report (a mixer's is the registry's)


# One row per mixer of the registry (tests/adapters/test_mixer_registry.py checks the names), in
# the order of the runs and the tables
RECALL_GAP_MIXERS = {
    "attention": MixerRecipe(cpu_learning_rate=1e-3, relative_cpu_cost=1.0, in_cpu_default=True),
    "based": MixerRecipe(
        cpu_learning_rate=1e-2, relative_cpu_cost=2.4, in_cpu_default=True, options=SHORT_CONV
    ),
    # the prefix is the context of 4 pairs, the fewest of any preset's shapes, so that it never holds
    # a query or an answer (the loss is on the answers, after the prefix, as the paper's decoder-only
    # loss; a --kv-pairs below 4 puts queries into it); the encoder's short convolutions bind keys to
    # values (without them it learned nothing at 1e-3, 3e-3 or 1e-2); the rate not swept (one run,
    # docs/recall_gap.md); left out of the CPU default's 10-minute budget
    "jrt_rnn": MixerRecipe(
        cpu_learning_rate=3e-3,
        relative_cpu_cost=2.4,
        in_cpu_default=False,
        options={"prefix_length": 8, **SHORT_CONV},
    ),
    "mamba": MixerRecipe(
        cpu_learning_rate=5e-3,
        relative_cpu_cost=4.6,
        in_cpu_default=True,
        options=MAMBA_INIT,
        cpu_options=MAMBA_CPU_START,
    ),
    "ttt_linear": MixerRecipe(
        cpu_learning_rate=1e-2, relative_cpu_cost=2.5, in_cpu_default=True, options=TTT_SHORT_CONV
    ),
    "ttt_mlp": MixerRecipe(
        cpu_learning_rate=1e-2, relative_cpu_cost=4.7, in_cpu_default=True, options=TTT_SHORT_CONV
    ),
    # 3e-3, not its seed-0 sweep's 1e-2, which stalled it in every seed of 100-104 (judged on 105-107)
    "gla": MixerRecipe(
        cpu_learning_rate=3e-3, relative_cpu_cost=4.7, in_cpu_default=True, options=SHORT_CONV
    ),
    "gated_deltanet": MixerRecipe(cpu_learning_rate=3e-3, relative_cpu_cost=3.4, in_cpu_default=True),
    "mamba2": MixerRecipe(cpu_learning_rate=1e-2, relative_cpu_cost=4.1, in_cpu_default=True),
    "longhorn": MixerRecipe(
        cpu_learning_rate=5e-3, relative_cpu_cost=3.6, in_cpu_default=True, cpu_options=LONGHORN_CPU_START
    ),
    # the CPU default's 10-minute budget leaves out the TTT family's Titans and LaCT (``--mixers`` adds
    # them): Titans alone trains about 9x slower than attention on this CPU
    "titans": MixerRecipe(
        cpu_learning_rate=3e-3, relative_cpu_cost=8.7, in_cpu_default=False, options=TITANS_MEMORY
    ),
    "lact": MixerRecipe(
        cpu_learning_rate=1e-2, relative_cpu_cost=4.5, in_cpu_default=False, options=LACT_RECALL
    ),
}
ALL_MIXERS = tuple(RECALL_GAP_MIXERS)
CPU_MIXERS = tuple(name for name, recipe in RECALL_GAP_MIXERS.items() if recipe.in_cpu_default)
MIXER_OPTIONS = {name: recipe.options for name, recipe in RECALL_GAP_MIXERS.items() if recipe.options}
# (the CPU preset's options: each mixer's cpu_options, else its options)
CPU_MIXER_OPTIONS = {
    name: options
    for name, recipe in RECALL_GAP_MIXERS.items()
    if (options := recipe.options if recipe.cpu_options is None else recipe.cpu_options)
}

# TTT-E2E (``ttt_mixer.e2e``) at the preset's width, layers, heads and vocabulary, its MLPs 4x wide as
# the Llama backbone's. Its window of 8 tokens is a quarter of the CPU training sequence (L32): only
# the queries right after the pairs have them in reach of two layers of windows, and the same model
# without inner steps stayed at chance (docs/recall_gap.md), so recall comes from the inner loop. One
# suffix block of two (the authors keep the suffix to the last quarter of the blocks, after plain
# ones), and mini-batches of 8: an L32-kv4 training sequence's inner loop steps 3 times (after tokens
# 8, 16 and 24), the first time on exactly its 8 pair tokens, before any query is read; 7 and 15
# times at L64 and L128.
E2E_RECALL = {"sliding_window_size": 8, "mini_batch_size": 8, "suffix_len": 1}

# The rows that are whole models of their own rather than a mixer in the preset's backbone (which
# they ignore), keyed by row name; tests/recall_gap/test_e2e_row.py checks that no name is a mixer's.
# TTT-E2E's rate is not swept (one value, learned with seed 0); its steps differentiate through the
# inner steps and cost 9-14 attention steps: over the CPU default's 10 minutes (docs/recall_gap.md)
RECALL_GAP_MODELS = {
    "ttt_e2e": MixerRecipe(
        cpu_learning_rate=3e-3,
        relative_cpu_cost=12.0,
        in_cpu_default=False,
        options=E2E_RECALL,
        description=f"TTT-E2E (ttt_mixer.e2e): sliding-window attention (window "
        f"{E2E_RECALL['sliding_window_size']}) in every block, and a suffix of "
        f"{E2E_RECALL['suffix_len']} block with a second MLP trained at test time by one SGD step per "
        f"mini-batch of {E2E_RECALL['mini_batch_size']} tokens",
    ),
}
# every row ``--mixers`` can choose, mixers first (the command line's choices and help read it)
ROW_NAMES = (*ALL_MIXERS, *RECALL_GAP_MODELS)
RECALL_GAP_ROWS = {**RECALL_GAP_MIXERS, **RECALL_GAP_MODELS}
MODEL_OPTIONS = {name: recipe.options for name, recipe in RECALL_GAP_MODELS.items()}

CPU = Preset(
    name="cpu",
    description="2-core CPU, about 9.5 minutes: Mamba backbone, 2 layers of width 64, 2000 steps of 16 MQAR L32-kv4",
    mixers=CPU_MIXERS,
    widths=(64,),
    num_layers=2,
    num_heads=1,
    train_shapes=(MQARShape(32, 4),),
    steps=2000,
    batch_size=16,
    # the best of 1e-3, 3e-3 and 1e-2 at the training shape, ties to the lower final training loss
    # (docs/recall_gap.md); Mamba and Longhorn with their CPU start: over seeds 0-2, the rate with
    # the most seeds at 0.9 or more, then the best median, then the best mean; GLA at the lower of its
    # two best (1e-2 stalled on unseen seeds; see its recipe); Titans (with its memory's residual and
    # LayerNorm) and LaCT (with its short convolutions): the best of the three over seeds 105-107
    learning_rates={name: recipe.cpu_learning_rate for name, recipe in RECALL_GAP_ROWS.items()},
    mixer_options={**CPU_MIXER_OPTIONS, **MODEL_OPTIONS},
    backbone="mamba",
    # L16 (4 and 12 symbols) in batches of 64: one answer per document, so as many answers per step as
    # MQAR's 16 x 4; at L32 in MQAR's 16 per step attention stayed at 0.26 and 0.14 (docs/recall_gap.md,
    # "Set disjointness"); 100 documents per shape
    set_disjointness=SetDisjointnessRecipe(lengths=(16,), steps=2000, batch_size=64, eval_samples=100),
)

ZOOLOGY_GPU = Preset(
    name="zoology-gpu",
    description="GPU: Zoology's MQAR sweep, widths 64-512, L64-kv4 to L512-kv64, 4 learning rates each",
    mixers=ALL_MIXERS,
    widths=(64, 128, 256, 512),
    num_layers=2,
    num_heads=1,
    train_shapes=(MQARShape(64, 4), MQARShape(128, 8), MQARShape(256, 16), MQARShape(512, 64)),
    steps=10_000,
    batch_size={64: 256, 128: 128, 256: 64, 512: 32},  # Zoology's batch size per length
    learning_rates=(1e-4, 4.6e-4, 2.2e-3, 1e-2),  # np.logspace(-4, -2, 4), rounded
    eval_samples=100,
    mixer_options={**MIXER_OPTIONS, **MODEL_OPTIONS},
    # not run (no GPU at hand): L64, whose 4x (256 symbols) the task's 338 symbols still hold
    set_disjointness=SetDisjointnessRecipe(lengths=(64,), steps=10_000, batch_size=256, eval_samples=200),
)

PRESETS = {preset.name: preset for preset in (CPU, ZOOLOGY_GPU)}
