"""lm-eval's Hugging Face loader (``--model hf``) runs a saved TTT checkpoint through
``trust_remote_code``: its log-likelihoods and greedy generations are the model's own, and the
``lm_eval`` command line scores a local task with it, offline."""

import json
import math
from pathlib import Path

import pytest
import torch
from eval_models import character_tokenizer, run_lm_eval, save_checkpoint, tiny_model
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import PreTrainedTokenizerFast

from ttt_mixer import TTTForCausalLM

pytestmark = [pytest.mark.compat, pytest.mark.slow]

# contexts without trailing spaces: lm-eval moves those into the continuation
PAIRS = [("hello wor", "ld"), ("the cat sat on the", " mat"), ("one two thr", "ee")]


@pytest.fixture(scope="module")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, TTTForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = character_tokenizer()
    model = tiny_model("ttt", tokenizer)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ttt-checkpoint")), model, tokenizer


def direct_loglikelihood(
    model: TTTForCausalLM, tokenizer: PreTrainedTokenizerFast, context: str, target: str
) -> float:
    context_ids, target_ids = tokenizer(context).input_ids, tokenizer(target).input_ids
    ids = torch.tensor([context_ids + target_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return logprobs[positions, ids[0, len(context_ids) :]].sum().item()


def test_hflm_loglikelihood_and_generation_are_the_models(checkpoint) -> None:
    path, model, tokenizer = checkpoint
    lm = HFLM(pretrained=str(path), trust_remote_code=True, batch_size=2, device="cpu")
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(PAIRS)
    ]
    for (got, _), (context, target) in zip(lm.loglikelihood(requests), PAIRS, strict=True):
        assert got == pytest.approx(direct_loglikelihood(model, tokenizer, context, target), abs=1e-4)

    prompt = "abc de"
    request = Instance(
        request_type="generate_until",
        doc={},
        arguments=(prompt, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
        idx=0,
    )
    ids = torch.tensor([tokenizer(prompt).input_ids])
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert lm.generate_until([request]) == [tokenizer.decode(expected).split("\n")[0]]


def test_lm_eval_command_line_scores_a_local_task(checkpoint, tmp_path: Path) -> None:
    path, model, tokenizer = checkpoint
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in PAIRS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ttt_smoke.yaml").write_text(
        "task: ttt_smoke\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: "{{continuation}}"\n'
        "metric_list:\n  - metric: perplexity\n"
    )
    args = [
        *("--model", "hf", "--model_args", f"pretrained={path},trust_remote_code=True"),
        *("--tasks", "ttt_smoke", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2"),
    ]
    results_file = run_lm_eval(args, tmp_path)
    perplexity = json.loads(results_file.read_text())["results"]["ttt_smoke"]["perplexity,none"]
    expected = math.exp(-sum(direct_loglikelihood(model, tokenizer, c, t) for c, t in PAIRS) / len(PAIRS))
    assert perplexity == pytest.approx(expected, rel=1e-4)
