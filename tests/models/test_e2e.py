"""TTT-E2E models (``ttt_mixer.e2e``): the inner step against a hand-made one, causality (a
mini-batch's last target is the next mini-batch's first token), the cache at any split, generation,
padding, the outer gradient through the inner loop (finite differences), saving and loading through
``auto_map``, and the errors of misuse. float64 unless said, weights perturbed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_without_cache, perturb_
from transformers import AutoModelForCausalLM

from ttt_mixer.e2e import E2EConfig, E2EForCausalLM
from ttt_mixer.models.causal_lm import CACHE_FIELD, REMOTE_CODE_FILE

pytestmark = pytest.mark.compat

VOCAB = 37
SIZE = 4  # mini-batch
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "mini_batch_size": SIZE,
    "sliding_window_size": 6,
    "suffix_len": 2,
    "inner_clip_gradient": 2.0,
    "pad_token_id": 0,
    "bos_token_id": None,
    "eos_token_id": None,
}


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides: object) -> E2EForCausalLM:
    torch.manual_seed(seed)
    model = E2EForCausalLM(E2EConfig(**{**TINY, "initializer_range": 0.2, **overrides}))
    return perturb_(model, seed + 1, scale=0.05).to(dtype).eval()


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def pieces_logits(model: E2EForCausalLM, tokens: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """The logits of ``tokens`` read in pieces ending at ``cuts``, each continuing the last's cache."""
    cache, logits, start = None, [], 0
    for end in [*cuts, tokens.shape[1]]:
        out = model(tokens[:, start:end], **{CACHE_FIELD: cache}, use_cache=True)
        cache, start = getattr(out, CACHE_FIELD), end
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cuts", [[1], [4], [5, 6, 7, 8, 9], [3, 11, 12], list(range(1, 23))])
def test_any_split_gives_the_logits_of_one_pass(dtype: torch.dtype, cuts: list[int]) -> None:
    # float32: the same float32 operations on differently shaped chunks round differently, and the
    # inner steps carry that on; measured 6e-6 at most here
    model, tokens = tiny_model(dtype), ids(2, 23)
    with torch.no_grad():
        whole = model(tokens).logits
        split = pieces_logits(model, tokens, cuts)
    torch.testing.assert_close(split, whole, rtol=0, atol=TOLERANCE[dtype])


def test_the_inner_loop_learns_and_is_causal() -> None:
    # a mini-batch's outputs use the weights before its own step; the step needs the next token, so
    # changing token SIZE (the first of the second mini-batch) leaves every earlier logit alone
    model, frozen, tokens = tiny_model(), tiny_model(inner_lr=0.0), ids(1, 3 * SIZE)
    changed = tokens.clone()
    changed[0, SIZE] = (tokens[0, SIZE] + 1) % VOCAB
    with torch.no_grad():
        learning, static, other = model(tokens).logits, frozen(tokens).logits, model(changed).logits
    torch.testing.assert_close(learning[:, :SIZE], static[:, :SIZE], rtol=0, atol=1e-12)
    assert (learning[:, SIZE:] - static[:, SIZE:]).abs().amax() > 1e-3
    torch.testing.assert_close(other[:, :SIZE], learning[:, :SIZE], rtol=0, atol=0)
    assert (other[:, SIZE:] - learning[:, SIZE:]).abs().amax(-1).min() > 0


@pytest.mark.parametrize("clip", [0.0, 0.05, 100.0])
def test_one_inner_step_is_clipped_sgd_on_the_mini_batchs_next_token_loss(clip: float) -> None:
    # with one suffix block, attention's keys do not depend on the inner weights (the inner MLP comes
    # after attention), so the second mini-batch's logits are those of the first step's weights
    model = tiny_model(suffix_len=1, inner_lr=0.7, inner_clip_gradient=clip)
    tokens = ids(1, 2 * SIZE + 1, seed=3)
    prime = model.model.layers[-1].feed_forward_prime
    weights = [prime.gate_proj.weight, prime.up_proj.weight, prime.down_proj.weight]
    logits = model(tokens[:, :SIZE]).logits
    loss = F.cross_entropy(logits[0], tokens[0, 1 : SIZE + 1])
    grads = torch.autograd.grad(loss, weights)
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    scale = min(1.0, clip / norm.item()) if clip else 1.0
    stepped = tiny_model(suffix_len=1, inner_lr=0.0)
    with torch.no_grad():
        target = stepped.model.layers[-1].feed_forward_prime
        for linear, weight, grad in zip(
            (target.gate_proj, target.up_proj, target.down_proj), weights, grads, strict=True
        ):
            linear.weight.copy_(weight - 0.7 * scale * grad)
        expected = stepped(tokens).logits[:, SIZE : 2 * SIZE]
        got = model(tokens).logits[:, SIZE : 2 * SIZE]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_outer_gradient_through_the_inner_steps_matches_finite_differences() -> None:
    model = tiny_model(
        hidden_size=8, intermediate_size=8, num_hidden_layers=2, suffix_len=1, sliding_window_size=3
    )
    tokens = ids(2, 3 * SIZE + 1, seed=4)
    prime = model.model.layers[-1].feed_forward_prime.gate_proj.weight
    attention = model.model.layers[0].attn.q_proj.weight

    def loss(gate: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        parameters = {
            "model.layers.1.feed_forward_prime.gate_proj.weight": gate,
            "model.layers.0.attn.q_proj.weight": query,
        }
        # the loss in float64 (the model's own casts it to float32)
        logits = torch.func.functional_call(model, parameters, (tokens,)).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

    inputs = (prime.detach().requires_grad_(), attention.detach().requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)


def test_generate_with_the_cache_equals_recomputation_greedy_and_beam_search() -> None:
    model, prompt = tiny_model(), ids(2, 6, seed=5)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=9, do_sample=False, pad_token_id=0)
        expected = greedy_without_cache(model, prompt, 9)
        beams = model.generate(prompt, max_new_tokens=9, num_beams=3, do_sample=False, pad_token_id=0)
        beams_without_cache = model.generate(
            prompt, max_new_tokens=9, num_beams=3, do_sample=False, pad_token_id=0, use_cache=False
        )
    assert torch.equal(generated, expected)
    assert torch.equal(beams, beams_without_cache)  # the cache reordered between beams


def test_left_padding_gives_each_sequence_its_own_logits() -> None:
    model = tiny_model()
    short, long = ids(1, 7, seed=6), ids(1, 11, seed=7)
    batch = torch.cat([F.pad(short, (4, 0)), long])
    mask = torch.cat([F.pad(torch.ones_like(short), (4, 0)), torch.ones_like(long)])
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        cache = getattr(model(batch[:, :6], attention_mask=mask[:, :6], use_cache=True), CACHE_FIELD)
        continued = model(batch[:, 6:], attention_mask=mask, **{CACHE_FIELD: cache}).logits
        alone_short, alone_long = model(short).logits, model(long).logits
    torch.testing.assert_close(padded[0, 4:], alone_short[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(padded[1], alone_long[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(continued[0], alone_short[0, 2:], rtol=0, atol=1e-10)
    torch.testing.assert_close(continued[1], alone_long[0, 6:], rtol=0, atol=1e-10)


def test_no_grad_and_training_forward_agree_and_gradients_reach_every_parameter() -> None:
    model, tokens = tiny_model(), ids(2, 13, seed=8)
    with torch.no_grad():
        expected = model(tokens).logits
    out = model(tokens, labels=tokens)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-12)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.requires_grad_(False)  # frozen weights, gradients on: the inner loop still learns
    torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=1e-12)


def test_saved_model_loads_through_auto_map_and_saves_the_same_auto_map_again(tmp_path) -> None:
    model, tokens = tiny_model(torch.float32), ids(1, 9)
    model.save_pretrained(tmp_path / "first")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "first", trust_remote_code=True).eval()
    assert type(loaded) is E2EForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-5)
    # transformers marks a class it loads through an auto_map for copying its source on save; the
    # registered class is loaded instead, so the second save is the first's
    loaded.save_pretrained(tmp_path / "second")
    first, second = (
        json.loads((tmp_path / name / "config.json").read_text()) for name in ("first", "second")
    )
    assert second["auto_map"] == first["auto_map"]
    assert sorted(path.name for path in (tmp_path / "second").glob("*.py")) == [REMOTE_CODE_FILE]


def test_tied_model_and_plain_sliding_window_transformer_run() -> None:
    tokens = ids(1, 10)
    for overrides in (
        {"tie_word_embeddings": True},
        {"suffix_len": 0},
        {"pre_norm": False, "qk_norm": False},
    ):
        model = tiny_model(**overrides)
        with torch.no_grad():
            torch.testing.assert_close(
                pieces_logits(model, tokens, [3, 7]), model(tokens).logits, rtol=0, atol=1e-10
            )


def test_misuse_is_refused_clearly() -> None:
    model, tokens = tiny_model(), ids(1, 5)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=model.model.embeddings(tokens))
    with pytest.raises(ValueError, match="packed"):
        model(tokens, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(tokens, output_hidden_states=True)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        model(tokens)
    with pytest.raises(ValueError, match="lm_head"):
        model.model(tokens)
    with pytest.raises(ValueError, match="suffix_len"):
        E2EConfig(**{**TINY, "suffix_len": 4})
    with pytest.raises(ValueError, match="even head size"):
        E2EConfig(**{**TINY, "hidden_size": 30})
    with pytest.raises(ValueError, match="inner_lr"):
        E2EConfig(**{**TINY, "inner_lr": -1.0})
    with pytest.raises(TypeError, match="mini_batch_size"):
        E2EConfig(**{**TINY, "mini_batch_size": 2.5})
    with pytest.raises(TypeError, match="unknown field"):
        E2EConfig(**TINY, window_size=4)


def test_a_row_of_padding_only_starts_its_sequence_in_the_next_call() -> None:
    model, first, second = tiny_model(), ids(2, 9), ids(2, 5, seed=3)
    mask = torch.ones_like(first)
    mask[0] = 0
    with torch.no_grad():
        out = model(first, attention_mask=mask, use_cache=True)
        full_mask = torch.cat([mask, torch.ones_like(second)], dim=1)
        continued = model(second, attention_mask=full_mask, **{CACHE_FIELD: getattr(out, CACHE_FIELD)}).logits
        assert torch.isfinite(out.logits).all()
        torch.testing.assert_close(out.logits[1], model(first[1:]).logits[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(continued[0], model(second[:1]).logits[0], rtol=0, atol=1e-10)
        whole = model(torch.cat([first[1:], second[1:]], dim=1)).logits[0, 9:]
        torch.testing.assert_close(continued[1], whole, rtol=0, atol=1e-10)
