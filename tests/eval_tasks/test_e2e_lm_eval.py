"""A saved TTT-E2E checkpoint in lm-eval (``--model hf``, ``trust_remote_code=True``, the way a process
that never imported ttt_mixer loads it): its log-likelihoods and greedy generations are the model's
own, and both ``lm_eval`` and ``ttt-mixer eval`` score a local loglikelihood and generation task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from eval_models import character_tokenizer, run_lm_eval, save_checkpoint
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import PreTrainedTokenizerFast

from ttt_mixer.e2e import E2EConfig, E2EForCausalLM

pytestmark = [pytest.mark.compat, pytest.mark.slow]

PAIRS = [("hello wor", "ld"), ("the cat sat on the", " mat"), ("one two thr", "ee")]


@pytest.fixture(scope="module")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, E2EForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = character_tokenizer()
    torch.manual_seed(0)
    config = E2EConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        mini_batch_size=4,
        sliding_window_size=8,
        suffix_len=1,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = E2EForCausalLM(config).eval()
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("e2e-checkpoint")), model, tokenizer


def direct_loglikelihood(
    model: E2EForCausalLM, tokenizer: PreTrainedTokenizerFast, context: str, target: str
) -> float:
    context_ids, target_ids = tokenizer(context).input_ids, tokenizer(target).input_ids
    ids = torch.tensor([context_ids + target_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return logprobs[positions, ids[0, len(context_ids) :]].sum().item()


def direct_generation(
    model: E2EForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, steps: int
) -> str:
    ids = torch.tensor([tokenizer(prompt).input_ids])
    generated = model.generate(ids, max_new_tokens=steps, do_sample=False)[0, ids.shape[1] :]
    return tokenizer.decode(generated).split("\n")[0]


def test_hflm_loglikelihood_and_generation_are_the_models(checkpoint) -> None:
    path, model, tokenizer = checkpoint
    lm = HFLM(pretrained=str(path), trust_remote_code=True, batch_size=2, device="cpu")
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(PAIRS)
    ]
    for (got, _), (context, target) in zip(lm.loglikelihood(requests), PAIRS, strict=True):
        assert got == pytest.approx(direct_loglikelihood(model, tokenizer, context, target), abs=1e-4)
    prompts = ["abc de", "the cat sat on"]  # different lengths: a left-padded batch
    requests = [
        Instance(
            request_type="generate_until",
            doc={},
            arguments=(prompt, {"until": ["\n"], "max_gen_toks": 7, "do_sample": False}),
            idx=i,
        )
        for i, prompt in enumerate(prompts)
    ]
    assert lm.generate_until(requests) == [direct_generation(model, tokenizer, p, 7) for p in prompts]


@pytest.mark.parametrize(
    "module", [("lm_eval",), ("ttt_mixer.cli", "eval")], ids=["lm_eval", "ttt-mixer-eval"]
)
def test_command_line_scores_a_loglikelihood_and_a_generation_task(
    checkpoint, tmp_path: Path, module: tuple
) -> None:
    path, model, tokenizer = checkpoint
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in PAIRS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tasks / "e2e_smoke_ll.yaml").write_text(
        f"task: e2e_smoke_ll\n{common}output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\nmetric_list:\n  - metric: perplexity\n'
    )
    (tasks / "e2e_smoke_gen.yaml").write_text(
        f"task: e2e_smoke_gen\n{common}output_type: generate_until\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 5\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    args = [
        *("--model", "hf", "--model_args", f"pretrained={path},trust_remote_code=True"),
        *("--tasks", "e2e_smoke_ll,e2e_smoke_gen", "--include_path", str(tasks)),
        *("--device", "cpu", "--batch_size", "2", "--log_samples"),
    ]
    results_file = run_lm_eval(args, tmp_path, module=module)
    results = json.loads(results_file.read_text())["results"]
    expected = math.exp(-sum(direct_loglikelihood(model, tokenizer, c, t) for c, t in PAIRS) / len(PAIRS))
    assert results["e2e_smoke_ll"]["perplexity,none"] == pytest.approx(expected, rel=1e-4)
    (samples_file,) = results_file.parent.glob("samples_e2e_smoke_gen_*.jsonl")
    generations = [json.loads(line)["filtered_resps"][0] for line in samples_file.read_text().splitlines()]
    assert sorted(generations) == sorted(direct_generation(model, tokenizer, c, 5) for c, _ in PAIRS)
