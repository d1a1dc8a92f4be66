"""What bad input gets, one row per case: the surface, the input, the exception (or, for a command,
exit status 2 with a one-line message) and words its message must contain. This table is the
specification of the project's input checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_layer, make_model
from fla.models.utils import Cache
from ops_cases import make_inputs
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ttt_mixer import TTTConfig, TTTLayer
from ttt_mixer.adapters import MixerLlamaConfig, MixerMambaConfig, swap_mixer
from ttt_mixer.adapters.distill import distill
from ttt_mixer.cli import main
from ttt_mixer.convert import CONFIG_FIELDS, LAYER_KEYS, MODEL_KEYS, from_ttt_lm_pytorch
from ttt_mixer.eval_tasks.perplexity import parse_options as ppl_options
from ttt_mixer.eval_tasks.recall import parse_options as recall_options
from ttt_mixer.models.causal_lm import CACHE_FIELD
from ttt_mixer.ops import FamilySpec, param_shapes, ttt_chunk, ttt_family_chunk, ttt_primal, ttt_step
from ttt_mixer.training import NonFiniteTrainingError


@dataclass(frozen=True)
class Case:
    surface: str
    given: str
    call: Callable[[Path], object]
    error: type[BaseException] | str  # "exit 2": a command's one-line error
    words: str


def op(function: Callable, **overrides: object) -> Callable[[Path], object]:
    inputs = make_inputs("linear", seq_len=1 if function is ttt_step else 8)
    return lambda _: function(*inputs.args(), **overrides)


def model(**overrides: object):
    return make_model(**overrides)


IDS = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))


def cache_of(build: Callable[[], torch.nn.Module], ids: torch.Tensor) -> Cache:
    return getattr(build()(ids, use_cache=True), CACHE_FIELD)


def llama_hybrid(num_layers: int = 4) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def distill_once(lr: float, ids: torch.Tensor | None = None) -> Callable[[Path], object]:
    def run(_: Path) -> object:
        teacher = llama_hybrid()
        student = swap_mixer(teacher, "ttt_linear", [1], mini_batch_size=4)
        return distill(
            student, teacher, IDS.repeat(2, 1) if ids is None else ids, 2, 0, lr, 2, progress=False
        )

    return run


def command(*argv: str) -> Callable[[Path], object]:
    """``ttt-mixer ARGV`` with {tmp} replaced by a fresh folder; {full} names a folder holding a file."""

    def run(tmp: Path) -> object:
        (tmp / "full").mkdir()
        (tmp / "full" / "config.json").write_text("{}")
        (tmp / "empty").mkdir()
        (tmp / "a-file").write_text("x")
        return main([arg.format(tmp=tmp) for arg in argv])

    return run


def attention_cache() -> Cache:
    """A 2-layer attention model's cache (keys and values), to feed a 2-layer TTT model."""
    return cache_of(lambda: swap_mixer(llama_hybrid(num_layers=2), "attention", [0]).eval(), IDS)


def mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows)


CASES = [
    # ops
    Case("ttt_chunk", "eps=-1", op(ttt_chunk, eps=-1.0), ValueError, "eps must be a finite number > 0"),
    Case("ttt_primal", "eps=0", op(ttt_primal, eps=0.0), ValueError, "eps must be a finite number > 0"),
    Case(
        "ttt_step", "eps=nan", op(ttt_step, eps=float("nan")), ValueError, "eps must be a finite number > 0"
    ),
    # layer
    Case("TTTLayer", "norm_eps=-1", lambda _: TTTLayer(64, 2, norm_eps=-1), ValueError, "norm_eps"),
    Case(
        "TTTLayer",
        "mini_batch_size=True",
        lambda _: TTTLayer(64, 2, mini_batch_size=True),
        TypeError,
        "mini_batch_size must be an int",
    ),
    Case(
        "TTTLayer",
        "mini_batch_size='16'",
        lambda _: TTTLayer(64, 2, mini_batch_size="16"),
        TypeError,
        "mini_batch_size must be an int",
    ),
    Case(
        "TTTLayer",
        "mini_batch_size=2.5",
        lambda _: TTTLayer(64, 2, mini_batch_size=2.5),
        TypeError,
        "mini_batch_size must be an int",
    ),
    Case("TTTLayer", "num_heads=0", lambda _: TTTLayer(64, 0), ValueError, "num_heads must be an int >= 1"),
    Case(
        "TTTLayer",
        "num_heads=3 (64 not divisible)",
        lambda _: TTTLayer(64, 3),
        ValueError,
        "divisible by num_heads",
    ),
    Case(
        "TTTLayer",
        "base_lr='fast'",
        lambda _: TTTLayer(64, 2, base_lr="fast"),
        TypeError,
        "base_lr must be a finite number",
    ),
    Case(
        "TTTLayer",
        "backend='jax'",
        lambda _: TTTLayer(64, 2, backend="jax"),
        ValueError,
        "backend must be one of",
    ),
    Case(
        "TTTLayer",
        "share_qk='yes'",
        lambda _: TTTLayer(64, 2, share_qk="yes"),
        TypeError,
        "share_qk must be True or False",
    ),
    Case(
        "TTTLayer.forward",
        "bf16 input, float64 layer",
        lambda _: make_layer()(torch.randn(1, 4, 16, dtype=torch.bfloat16)),
        TypeError,
        "dtype",
    ),
    Case(
        "TTTLayer.forward",
        "hidden width 15",
        lambda _: make_layer()(torch.randn(1, 4, 15, dtype=torch.float64)),
        ValueError,
        "hidden_size = 16",
    ),
    Case(
        "TTTLayer.forward",
        "mask and cu_seqlens",
        lambda _: make_layer()(
            torch.randn(1, 4, 16, dtype=torch.float64),
            attention_mask=mask([[0, 1, 1, 1]]),
            cu_seqlens=torch.tensor([0, 4]),
        ),
        ValueError,
        "not both",
    ),
    Case(
        "TTTLayer.forward",
        "mask of 2 rows for 1",
        lambda _: make_layer()(
            torch.randn(1, 4, 16, dtype=torch.float64), attention_mask=mask([[1] * 4] * 2)
        ),
        ValueError,
        "attention_mask must be a 0/1 padding mask",
    ),
    # config
    Case(
        "TTTConfig",
        "ttt_norm_eps=-1",
        lambda _: TTTConfig(ttt_norm_eps=-1),
        ValueError,
        "ttt_norm_eps must be a finite number > 0",
    ),
    Case(
        "TTTConfig",
        "num_attention_heads=0",
        lambda _: TTTConfig(num_attention_heads=0),
        ValueError,
        "num_attention_heads must be an int >= 1",
    ),
    Case(
        "TTTConfig",
        "ttt_layer='mlp' (unknown field)",
        lambda _: TTTConfig(ttt_layer="mlp"),
        TypeError,
        "did you mean 'ttt_layer_type'",
    ),
    Case(
        "TTTConfig",
        "mini_batch_size='16'",
        lambda _: TTTConfig(mini_batch_size="16"),
        TypeError,
        "mini_batch_size must be an int",
    ),
    Case(
        "TTTConfig",
        "ttt_layer_type='rnn'",
        lambda _: TTTConfig(ttt_layer_type="rnn"),
        ValueError,
        "ttt_layer_type must be one of",
    ),
    Case("TTTConfig", "rms_norm_eps=0", lambda _: TTTConfig(rms_norm_eps=0), ValueError, "rms_norm_eps"),
    Case(
        "MixerLlamaConfig",
        "mixer=[...] (a misspelt own field)",
        lambda _: MixerLlamaConfig(mixer=["attention"]),
        TypeError,
        "did you mean 'mixers'",
    ),
    Case(
        "MixerMambaConfig",
        "num_head=2 (a misspelt own field)",
        lambda _: MixerMambaConfig(num_head=2),
        TypeError,
        "did you mean 'num_heads'",
    ),
    # models
    Case(
        "TTTForCausalLM",
        "float input_ids",
        lambda _: model()(IDS.float()),
        TypeError,
        "input_ids must be an integer tensor",
    ),
    Case(
        "TTTForCausalLM",
        "id 50 with vocab_size 50",
        lambda _: model()(torch.full((2, 6), 50)),
        ValueError,
        "vocab_size = 50",
    ),
    Case(
        "TTTForCausalLM",
        "inputs_embeds of width 31",
        lambda _: model()(inputs_embeds=torch.randn(2, 6, 31)),
        ValueError,
        "hidden_size = 32",
    ),
    Case(
        "TTTForCausalLM",
        "bf16 inputs_embeds",
        lambda _: model()(inputs_embeds=torch.randn(2, 6, 32, dtype=torch.bfloat16)),
        TypeError,
        "dtype",
    ),
    Case(
        "TTTForCausalLM",
        "labels one short",
        lambda _: model()(IDS, labels=IDS[:, 1:]),
        ValueError,
        "labels must have the input's shape",
    ),
    Case(
        "TTTForCausalLM",
        "a 1-layer model's cache",
        lambda _: model()(IDS, cache=cache_of(lambda: make_model(num_hidden_layers=1), IDS), use_cache=True),
        ValueError,
        "another model",
    ),
    Case(
        "TTTForCausalLM",
        "an attention model's cache",
        lambda _: model()(IDS, cache=attention_cache(), use_cache=True),
        ValueError,
        "another model",
    ),
    Case(
        "TTTForCausalLM",
        "cache and past_key_values",
        lambda _: model()(IDS, cache=Cache(), past_key_values=Cache()),
        ValueError,
        "not both",
    ),
    Case(
        "TTTForCausalLM",
        "attention_maks=",
        lambda _: model()(IDS, attention_maks=torch.ones_like(IDS)),
        TypeError,
        "attention_maks",
    ),
    Case(
        "TTTForCausalLM",
        "a DynamicCache",
        lambda _: model()(IDS, cache=DynamicCache(), use_cache=True),
        TypeError,
        "DynamicCache",
    ),
    Case(
        "TTTForCausalLM.generate",
        "cache_implementation='static'",
        lambda _: model().generate(IDS, max_new_tokens=1, cache_implementation="static"),
        ValueError,
        "not supported",
    ),
    # adapters
    Case(
        "swap_mixer",
        "layers='every:9' of 4",
        lambda _: swap_mixer(llama_hybrid(), "ttt_linear", "every:9"),
        ValueError,
        "selects no layer",
    ),
    Case(
        "swap_mixer",
        "layers=2",
        lambda _: swap_mixer(llama_hybrid(), "ttt_linear", 2),
        TypeError,
        "layers must be 'all', 'every:k' or a list",
    ),
    Case(
        "swap_mixer",
        "layers=[7] of 4",
        lambda _: swap_mixer(llama_hybrid(), "ttt_linear", [7]),
        ValueError,
        "out of range",
    ),
    Case("distill", "lr=inf", distill_once(float("inf")), ValueError, "lr must be a finite number > 0"),
    Case(
        "distill",
        "lr=1e30 (training turns non-finite)",
        distill_once(1e30),
        NonFiniteTrainingError,
        "non-finite",
    ),
    Case(
        "distill",
        "a token id of 50 in a vocabulary of 50",
        distill_once(1e-3, torch.cat([IDS, torch.full((2, 1), 50)], dim=1)),
        ValueError,
        "input_ids must be token ids in [0, 50)",
    ),
    Case("distill", "0 sequences", distill_once(1e-3, IDS[:0]), ValueError, "input_ids holds no tokens"),
    # evaluation-task options
    Case(
        "ttt_recall options",
        "context_length",
        lambda _: recall_options({"context_length": [64]}),
        ValueError,
        "did you mean 'context_lengths'",
    ),
    Case(
        "ttt_recall options",
        "num_sample",
        lambda _: recall_options({"num_sample": 3}),
        ValueError,
        "did you mean 'num_samples'",
    ),
    Case(
        "ttt_ppl options",
        "bucket_edges",
        lambda _: ppl_options({"bucket_edges": [0, 64]}),
        ValueError,
        "did you mean 'ppl_bucket_edges'",
    ),
    Case(
        "ttt_recall options",
        "mqar_seq_length (prefixed)",
        lambda _: recall_options({"mqar_seq_length": [64]}),
        ValueError,
        "unknown ttt_recall option",
    ),
    # commands
    Case(
        "ttt-mixer demo",
        "--train-steps -1",
        command("demo", "--train-steps", "-1"),
        "exit 2",
        "expected an integer >= 0",
    ),
    Case(
        "ttt-mixer convert",
        "missing folder",
        command("convert", "{tmp}/nope", "{tmp}/out"),
        "exit 2",
        "no such folder",
    ),
    Case(
        "ttt-mixer convert",
        "destination holds files",
        command("convert", "{tmp}/empty", "{tmp}/full"),
        "exit 2",
        "--overwrite",
    ),
    Case(
        "ttt-mixer convert",
        "destination is a file",
        command("convert", "{tmp}/empty", "{tmp}/a-file"),
        "exit 2",
        "is a file",
    ),
    Case(
        "ttt-mixer convert",
        "--set without =",
        command("convert", "{tmp}/empty", "{tmp}/out", "--from", "ttt-e2e", "--set", "mini_batch_size"),
        "exit 2",
        "expected FIELD=VALUE",
    ),
    Case(
        "ttt-mixer convert",
        "--set for a ttt-lm-pytorch checkpoint",
        command("convert", "{tmp}/empty", "{tmp}/out", "--set", "mini_batch_size=8"),
        "exit 2",
        "--set applies to --from ttt-e2e only",
    ),
    Case(
        "ttt-mixer convert",
        "--from ttt-e2e, a folder without their checkpoint",
        command("convert", "{tmp}/empty", "{tmp}/out", "--from", "ttt-e2e"),
        "exit 2",
        "not a checkpoint of the authors' code",
    ),
    Case(
        "ttt-mixer swap",
        "missing source",
        command("swap", "{tmp}/nope", "{tmp}/out", "--mixer", "ttt_linear"),
        "exit 2",
        "no such checkpoint folder",
    ),
    Case(
        "ttt-mixer swap",
        "destination holds files",
        command("swap", "{tmp}/empty", "{tmp}/full", "--mixer", "ttt_linear"),
        "exit 2",
        "--overwrite",
    ),
    Case(
        "ttt-mixer swap",
        "--layers first",
        command("swap", "{tmp}/empty", "{tmp}/out", "--mixer", "ttt_linear", "--layers", "first"),
        "exit 2",
        "--layers takes",
    ),
    Case(
        "ttt-mixer distill",
        "--lr inf",
        command("distill", "a", "b", "{tmp}/out", "--text", "t.txt", "--lr", "inf"),
        "exit 2",
        "expected a finite number > 0",
    ),
    Case(
        "ttt-mixer distill",
        "missing --text",
        command("distill", "{tmp}/empty", "{tmp}/empty", "{tmp}/out", "--text", "{tmp}/none.txt"),
        "exit 2",
        "no such file",
    ),
    Case(
        "ttt-mixer recall-gap",
        "--out is a file",
        command("recall-gap", "--out", "{tmp}/a-file"),
        "exit 2",
        "is a file",
    ),
    Case(
        "ttt-mixer recall-gap",
        "--checkpoints missing",
        command("recall-gap", "--out", "{tmp}/rg", "--checkpoints", "{tmp}/nope"),
        "exit 2",
        "no such checkpoint folder",
    ),
]

# inputs of the models, layers, ops and converter that reached a library's internals or were cast
# silently (issue 26), and position_ids, which mean packed sequences only where they restart at 0
FAMILY_SPEC = FamilySpec("linear", mini_batch_size=4)
TTT_INPUTS = make_inputs("linear", seq_len=8, dtype=torch.float32)


def ttt_state(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A TTT-Linear state of TTT_INPUTS' two rows, its floating tensors in ``dtype``."""
    _, state = ttt_chunk(*TTT_INPUTS.args(), output_final_state=True)
    return tuple(t if i == 0 else t.to(dtype) for i, t in enumerate(state))


def family_op(state_dtype: torch.dtype) -> Callable[[Path], object]:
    """A TTT-family chunk over float32 inputs, from its own final state cast to ``state_dtype``."""
    inputs = TTT_INPUTS
    params = tuple(0.3 * torch.randn(shape) for shape in param_shapes(FAMILY_SPEC, 2, 4))
    kwargs = {
        "spec": FAMILY_SPEC,
        **{
            name: getattr(inputs, name)
            for name in ("q", "k", "v", "lr", "token_offset", "ln_weight", "ln_bias")
        },
        "params": params,
        "momentum": None,
        "forget": None,
    }

    def run(_: Path) -> object:
        _, state = ttt_family_chunk(**kwargs, output_final_state=True)
        cast = tuple(t if i == 0 else t.to(state_dtype) for i, t in enumerate(state))
        return ttt_family_chunk(**kwargs, initial_state=cast)

    return run


def their_checkpoint(**changes: object) -> dict[str, object]:
    """A tiny state dict in the authors' layout (from a model of ours), with ``changes`` by key."""
    ours = make_model(perturb=0)
    theirs = {}
    for key, tensor in ours.state_dict().items():
        if key == "lm_head.weight":
            continue
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        template = LAYER_KEYS.get(key.replace(f".{layer}.", ".{i}.", 1)) if layer else MODEL_KEYS[key]
        theirs[template.format(i=layer)] = tensor
    return theirs | changes


THEIR_CONFIG = {k: v for k, v in make_model(perturb=0).config.to_dict().items() if k in CONFIG_FIELDS}
PACKED = torch.tensor([[0, 1, 2, 0, 1, 0]])


def mixer_llama() -> torch.nn.Module:
    return swap_mixer(llama_hybrid(num_layers=2), "gla", [1]).eval()


CASES += [
    Case(
        "ttt_chunk",
        "bool cu_seqlens",
        lambda _: ttt_chunk(*TTT_INPUTS.rows(0).args(), cu_seqlens=torch.tensor([False, True])),
        TypeError,
        "cu_seqlens must be a 1-D integer tensor",
    ),
    Case(
        "ttt_chunk",
        "float64 initial_state, float32 inputs",
        lambda _: ttt_chunk(*TTT_INPUTS.args(), initial_state=ttt_state(torch.float64)),
        TypeError,
        "initial_state tensors must be torch.float32 for torch.float32 inputs",
    ),
    Case(
        "ttt_step",
        "int64 initial_state",
        lambda _: ttt_step(*TTT_INPUTS.tokens(0, 1).args(), initial_state=ttt_state(torch.int64)),
        TypeError,
        "initial_state tensors must be torch.float32",
    ),
    Case(
        "ttt_family_chunk",
        "float64 initial_state, float32 inputs",
        family_op(torch.float64),
        TypeError,
        "initial_state tensors must be torch.float32",
    ),
    Case(
        "TTTLayer.forward",
        "batch of 0",
        lambda _: make_layer()(torch.randn(0, 4, 16, dtype=torch.float64)),
        ValueError,
        "hidden_states must hold at least one sequence",
    ),
    Case(
        "TTTLayer.forward",
        "bool cu_seqlens",
        lambda _: make_layer()(
            torch.randn(1, 4, 16, dtype=torch.float64), cu_seqlens=torch.tensor([True, True])
        ),
        TypeError,
        "cu_seqlens must be a 1-D integer tensor",
    ),
    Case(
        "TTTForCausalLM",
        "batch of 0",
        lambda _: model()(IDS[:0]),
        ValueError,
        "input_ids must hold at least one sequence (batch_size >= 1)",
    ),
    Case(
        "MixerLlamaForCausalLM",
        "inputs_embeds batch of 0",
        lambda _: mixer_llama()(inputs_embeds=torch.randn(0, 6, 32)),
        ValueError,
        "inputs_embeds must hold at least one sequence",
    ),
    Case(
        "TTTForCausalLM",
        "past_key_values=[1, 2] (junk legacy cache)",
        lambda _: model()(IDS, past_key_values=[1, 2], use_cache=True),
        TypeError,
        "past_key_values / cache) must hold, per layer, None or a dict",
    ),
    Case(
        "TTTForCausalLM",
        "legacy cache of unknown states",
        lambda _: model()(IDS, past_key_values=[{"keys": IDS}, None], use_cache=True),
        TypeError,
        "layer 0 holds ['keys']",
    ),
    Case(
        "TTTForCausalLM",
        "bool cu_seqlens",
        lambda _: model()(IDS[:1], cu_seqlens=torch.tensor([0, 6]).bool()),
        TypeError,
        "cu_seqlens must be a 1-D integer tensor",
    ),
    Case(
        "TTTForCausalLM",
        "float position_ids",
        lambda _: model()(IDS, position_ids=torch.arange(6.0)[None]),
        TypeError,
        "position_ids must be an integer tensor",
    ),
    Case(
        "TTTForCausalLM",
        "position_ids of 5 positions for 6 tokens",
        lambda _: model()(IDS, position_ids=torch.arange(5)[None]),
        ValueError,
        "position_ids must have shape [batch_size, seq_len] = [2, 6]",
    ),
    Case(
        "TTTForCausalLM",
        "position_ids from 1, no cache",
        lambda _: model()(IDS, position_ids=torch.arange(1, 7)[None]),
        ValueError,
        "position_ids of each row must count from 0",
    ),
    Case(
        "TTTForCausalLM",
        "position_ids restarting at 0 in a batch of 2",
        lambda _: model()(IDS, position_ids=PACKED.expand(2, -1)),
        ValueError,
        "which take batch size 1",
    ),
    Case(
        "TTTForCausalLM",
        "position_ids disagreeing with cu_seqlens",
        lambda _: model()(IDS[:1], position_ids=PACKED, cu_seqlens=torch.tensor([0, 3, 6])),
        ValueError,
        "position_ids disagree with cu_seqlens",
    ),
    Case(
        "TTTForCausalLM",
        "position_ids restarting at 0 under a padding mask",
        lambda _: model()(IDS[:1], position_ids=PACKED, attention_mask=mask([[0, 1, 1, 1, 1, 1]])),
        ValueError,
        "position_ids of a padded batch must count up by one",
    ),
    Case(
        "TTTForCausalLM",
        "position_ids -1 at a real token",
        lambda _: model()(
            IDS[:1], position_ids=torch.arange(-2, 4)[None], attention_mask=mask([[0, 1, 1, 1, 1, 1]])
        ),
        ValueError,
        "position_ids must be >= 0 at real tokens",
    ),
    Case(
        "TTTForCausalLM",
        "position_ids restarting after a cache",
        lambda _: model()(IDS, cache=cache_of(model, IDS), position_ids=torch.zeros(2, 6, dtype=torch.long)),
        ValueError,
        "count on from the 6 cached tokens",
    ),
    Case(
        "MixerLlamaForCausalLM",
        "position_ids from 2, no cache",
        lambda _: mixer_llama()(IDS, position_ids=torch.arange(2, 8)[None]),
        ValueError,
        "position_ids of each row must count from 0",
    ),
    Case(
        "MixerLlamaForCausalLM",
        "packed position_ids with use_cache=True",
        lambda _: mixer_llama()(IDS[:1], position_ids=PACKED, use_cache=True),
        ValueError,
        "run without a cache",
    ),
    Case(
        "from_ttt_lm_pytorch",
        "config=[1, 2]",
        lambda _: from_ttt_lm_pytorch(their_checkpoint(), [1, 2]),
        TypeError,
        "config must be a dict of their TTTConfig fields",
    ),
    Case(
        "from_ttt_lm_pytorch",
        "a numpy array",
        lambda _: from_ttt_lm_pytorch(their_checkpoint(**{"norm.weight": np.ones(32)}), THEIR_CONFIG),
        TypeError,
        "state_dict values must be torch.Tensor, got ['norm.weight (ndarray)']",
    ),
    Case(
        "from_ttt_lm_pytorch",
        "an int64 tensor",
        lambda _: from_ttt_lm_pytorch(
            their_checkpoint(**{"norm.weight": torch.ones(32, dtype=torch.long)}), THEIR_CONFIG
        ),
        TypeError,
        "state_dict tensors must be floating point, got ['norm.weight (torch.int64)']",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.surface}: {c.given}" for c in CASES])
def test_bad_input_gets_a_clear_early_error(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if case.error == "exit 2":
        with pytest.raises(SystemExit) as exit_info:
            case.call(tmp_path)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err.strip()
        assert "Traceback" not in message and case.words in message, message
        return
    with pytest.raises(case.error) as error_info:
        case.call(tmp_path)
    assert case.words in str(error_info.value), str(error_info.value)


def test_no_folder_is_created_or_changed_by_a_refused_command(tmp_path: Path) -> None:
    for case in CASES:
        if case.error == "exit 2" and "destination holds files" in case.given:
            with pytest.raises(SystemExit):
                case.call(tmp_path)
            assert [p.name for p in (tmp_path / "full").iterdir()] == ["config.json"]
            assert (tmp_path / "full" / "config.json").read_text() == "{}"
            for path in tmp_path.iterdir():
                if path.is_dir():
                    for child in path.iterdir():
                        child.unlink()
                    path.rmdir()
                else:
                    path.unlink()


def test_demo_runs_without_training(capsys: pytest.CaptureFixture[str]) -> None:
    """``--train-steps 0`` is a valid request (an untrained model), not a crash, and prints no loss
    (it has none: not "loss nan")."""
    main(["demo", "--train-steps", "0", "--new-tokens", "2", "--hidden-size", "32", "--layers", "1"])
    out = capsys.readouterr().out
    assert "trained 0 steps" in out and "loss" not in out
