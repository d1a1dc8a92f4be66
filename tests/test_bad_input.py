"""What bad input gets, one row per case: the surface, the input, the exception (or, for a command,
exit status 2 with a one-line message) and words its message must contain. This table is the
specification of the project's input checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_layer, make_model
from fla.models.utils import Cache
from ops_cases import make_inputs
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ttt_mixer import TTTConfig, TTTLayer
from ttt_mixer.adapters import MixerLlamaConfig, MixerMambaConfig, swap_mixer
from ttt_mixer.adapters.distill import NonFiniteTrainingError, distill
from ttt_mixer.cli import main
from ttt_mixer.eval_tasks.perplexity import parse_options as ppl_options
from ttt_mixer.eval_tasks.recall import parse_options as recall_options
from ttt_mixer.models.causal_lm import CACHE_FIELD
from ttt_mixer.ops import ttt_chunk, ttt_primal, ttt_step


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
        "all-zero mask row",
        lambda _: model()(IDS, attention_mask=mask([[1] * 6, [0] * 6])),
        ValueError,
        "rows [1] are all 0",
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
    """``--train-steps 0`` is a valid request (an untrained model), not a crash."""
    main(["demo", "--train-steps", "0", "--new-tokens", "2", "--hidden-size", "32", "--layers", "1"])
    assert "trained 0 steps" in capsys.readouterr().out
