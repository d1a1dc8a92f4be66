"""Generation and the causal-LM interface of every model of the project (TTT with both backbones and
inner models; the Mixer Llama backbone with each mixer, and a Mamba-backbone hybrid), on whatever
transformers is installed: the cache as ``cache=`` and ``past_key_values=``, every decoding mode
equal to recomputation without a cache, left padding, ``inputs_embeds``, continuing from a returned
cache, a row of padding only (beside real rows and in a chunked prefill), ``shift_labels``, hidden
states and attentions, and the errors of misuse. float64, weights perturbed so that no parameter sits
at a constant initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_CASE_IDS, MODEL_CASES, TINY_MIXER_OPTIONS, make_model, perturb_
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM, PreTrainedModel

from ttt_mixer.adapters import MIXER_NAMES, swap_mixer
from ttt_mixer.models.causal_lm import CACHE_FIELD

pytestmark = pytest.mark.compat

VOCAB = 40
PROMPT_LEN = 7
NEW_TOKENS = 5
TOLERANCE = 1e-10
# Gated DeltaNet l2-normalises q and k in float32 whatever the input's dtype (as fla's kernels do), so
# models holding it agree to float32 precision only
FLOAT32_STATE_TOLERANCE = 1e-6
# generate hands out float32 logits (it casts them): the float64 truth rounded to float32, within one
# float32 rounding
FLOAT32_ROUNDING = {"rtol": 2**-23, "atol": 0.0}
MAMBA_HYBRID = ["mamba", "attention", "ttt_linear", "gated_deltanet"]


def mixer_llama(mixer: str) -> PreTrainedModel:
    """A 2-layer Llama whose second layer holds ``mixer`` (the first keeps attention)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    model = swap_mixer(LlamaForCausalLM(config), mixer, [1], **TINY_MIXER_OPTIONS.get(mixer, {}))
    return perturb_(model, seed=5, scale=0.05).double().eval()


def mixer_mamba_hybrid() -> PreTrainedModel:
    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=len(MAMBA_HYBRID),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    model = MambaForCausalLM(config)
    for i, mixer in enumerate(MAMBA_HYBRID):
        model = swap_mixer(model, mixer, [i], **TINY_MIXER_OPTIONS.get(mixer, {}))
    return perturb_(model, seed=5, scale=0.05).double().eval()


def ttt_model(inner: str, backbone: str) -> PreTrainedModel:
    return make_model(inner, backbone, dtype=torch.float64, vocab_size=VOCAB)


MODELS = {
    **{
        f"ttt-{i}": (lambda c=case: ttt_model(*c))
        for i, case in zip(MODEL_CASE_IDS, MODEL_CASES, strict=True)
    },
    **{f"llama-{mixer}": (lambda m=mixer: mixer_llama(m)) for mixer in MIXER_NAMES},
    "mamba-hybrid": mixer_mamba_hybrid,
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return MODELS[request.param]()


def tolerance(model: PreTrainedModel) -> dict[str, float]:
    """assert_close's bounds for float64 logits of ``model``."""
    float32_state = "gated_deltanet" in getattr(model.config, "mixers", ())
    return {"rtol": 0.0, "atol": FLOAT32_STATE_TOLERANCE if float32_state else TOLERANCE}


def generated_tolerance(model: PreTrainedModel) -> dict[str, float]:
    """assert_close's bounds for the float32 logits that generate returns."""
    return FLOAT32_ROUNDING if tolerance(model)["atol"] == TOLERANCE else tolerance(model)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 7, 4 and 6 tokens, left-padded to [3, 7], and their mask."""
    ids = torch.randint(3, VOCAB, (3, PROMPT_LEN), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 3), (2, 1)):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def full_forward_logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits of the last position, recomputed from scratch without a cache."""
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False).logits[:, -1]


def generate(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None, **options):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        return_dict_in_generate=True,
        output_logits=True,
        **options,
    )


def test_greedy_logits_equal_a_full_forward_at_every_step(model: PreTrainedModel) -> None:
    ids, mask = prompts()
    with torch.no_grad():
        out = generate(model, ids, mask, do_sample=False)
    assert out.sequences.shape == (3, PROMPT_LEN + NEW_TOKENS)
    for step, logits in enumerate(out.logits):
        length = PROMPT_LEN + step
        step_mask = torch.cat([mask, mask.new_ones(3, step)], dim=1)
        expected = full_forward_logits(model, out.sequences[:, :length], step_mask)
        torch.testing.assert_close(logits, expected.float(), **generated_tolerance(model), msg=f"step {step}")


def test_left_padded_rows_equal_each_prompt_alone(model: PreTrainedModel) -> None:
    ids, mask = prompts()
    with torch.no_grad():
        batch = generate(model, ids, mask, do_sample=False)
        for row in range(3):
            real = int(mask[row].sum())
            alone = generate(model, ids[row : row + 1, -real:], None, do_sample=False)
            assert torch.equal(batch.sequences[row, PROMPT_LEN:], alone.sequences[0, real:]), row
            for step in range(NEW_TOKENS):
                torch.testing.assert_close(
                    batch.logits[step][row], alone.logits[step][0], **generated_tolerance(model)
                )


@pytest.mark.parametrize(
    "options",
    [
        {"do_sample": True, "top_k": 0},
        {"do_sample": False, "num_beams": 3},
        {"do_sample": True, "num_beams": 2, "top_k": 0},
    ],
    ids=["sampling", "beam-search", "beam-sampling"],
)
def test_decoding_with_the_cache_equals_decoding_without_it(model: PreTrainedModel, options: dict) -> None:
    ids, mask = prompts()
    sequences = {}
    with torch.no_grad():
        for use_cache in (True, False):
            torch.manual_seed(11)
            sequences[use_cache] = generate(model, ids, mask, use_cache=use_cache, **options).sequences
    assert torch.equal(sequences[True], sequences[False])


def test_generation_from_inputs_embeds_equals_from_input_ids(model: PreTrainedModel) -> None:
    ids, mask = prompts()
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        from_ids = generate(model, ids, mask, do_sample=False)
        from_embeds = generate(model, None, mask, inputs_embeds=embeds, do_sample=False)
    # from embeddings, generate returns only the new tokens
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, PROMPT_LEN:])
    for a, b in zip(from_embeds.logits, from_ids.logits, strict=True):
        torch.testing.assert_close(a, b, **generated_tolerance(model))


def test_continuing_from_a_returned_cache_equals_one_call(model: PreTrainedModel) -> None:
    ids, mask = prompts()
    with torch.no_grad():
        whole = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        first = model.generate(
            ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
        )
        cache = getattr(first, CACHE_FIELD)
        continued = model.generate(
            first.sequences,
            attention_mask=torch.cat([mask, mask.new_ones(3, 3)], dim=1),
            max_new_tokens=3,
            do_sample=False,
            **{CACHE_FIELD: cache},
        )
    assert torch.equal(continued, whole)


def test_cache_and_past_key_values_are_the_same_argument(model: PreTrainedModel) -> None:
    ids, mask = prompts()
    nexts = torch.randint(3, VOCAB, (3, 2), generator=torch.Generator().manual_seed(4))
    full_mask = torch.cat([mask, mask.new_ones(3, 2)], dim=1)
    with torch.no_grad():
        expected = model(torch.cat([ids, nexts], dim=1), attention_mask=full_mask).logits[:, -2:]
        for name in ("cache", "past_key_values"):
            cache = getattr(model(ids, attention_mask=mask, use_cache=True), CACHE_FIELD)
            assert cache.get_seq_length() == PROMPT_LEN  # positions of the padded batch
            out = model(nexts, attention_mask=full_mask, use_cache=True, **{name: cache})
            torch.testing.assert_close(out.logits, expected, **tolerance(model), msg=name)
            assert getattr(out, CACHE_FIELD).get_seq_length() == PROMPT_LEN + 2
            with pytest.raises(ValueError, match="not both"):
                model(nexts, cache=cache, past_key_values=cache, use_cache=True)


def test_unknown_keywords_and_foreign_caches_are_errors(model: PreTrainedModel) -> None:
    ids, mask = prompts()
    with pytest.raises(TypeError, match="attention_maks"):
        model(ids, attention_maks=mask)
    with pytest.raises(TypeError, match="DynamicCache"):
        from transformers import DynamicCache

        model(ids, cache=DynamicCache(), use_cache=True)


def test_shift_labels_give_the_labels_loss(model: PreTrainedModel) -> None:
    ids, _ = prompts()
    labels = ids.clone()
    labels[1, :3] = -100
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        loss = model(ids, labels=labels).loss
        torch.testing.assert_close(model(ids, shift_labels=shifted).loss, loss, **tolerance(model))
        torch.testing.assert_close(
            model(ids, labels=labels, shift_labels=shifted).loss, loss, **tolerance(model)
        )
    with pytest.raises(ValueError, match="labels must have"):
        model(ids, labels=labels[:, 1:])


def test_hidden_states_under_padding_are_in_the_graph(model: PreTrainedModel) -> None:
    ids, mask = prompts()
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for hidden in out.hidden_states:
        assert hidden.shape == (3, PROMPT_LEN, model.config.hidden_size)
        hidden.retain_grad()
    out.logits[mask.bool()].sum().backward()
    for i, hidden in enumerate(out.hidden_states):
        assert hidden.grad is not None and hidden.grad[mask.bool()].abs().sum() > 0, i
    model.zero_grad(set_to_none=True)


def test_output_attentions_gives_weights_for_attention_and_none_elsewhere(model: PreTrainedModel) -> None:
    ids, mask = prompts()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    mixers = getattr(model.config, "mixers", ["ttt"] * model.config.num_hidden_layers)
    assert len(out.attentions) == len(mixers)
    for mixer, weights in zip(mixers, out.attentions, strict=True):
        if mixer != "attention":
            assert weights is None
            continue
        assert weights.dim() == 4 and weights.shape[0] == 3 and weights.shape[2:] == (PROMPT_LEN, PROMPT_LEN)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))
        # causal, and no real query looks at padding
        assert not weights.triu(1).any()
        assert not weights[1, :, 3:, :3].any()


def test_a_static_cache_is_refused(model: PreTrainedModel) -> None:
    ids, mask = prompts()
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")


def test_a_fully_padded_row_leaves_the_others_exact(model: PreTrainedModel) -> None:
    """A row of padding only (the mask's row all 0) beside real rows: every real row's logits are its
    own, alone, its padding's are finite; a decode step after it (the padded row's first real token)
    gives each row's next logits, the empty row's those of its one token alone."""
    ids, mask = prompts()
    mask[1] = 0
    ids[1] = 0
    token = torch.randint(3, VOCAB, (3, 1), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        assert torch.isfinite(out.logits).all()
        step = model(
            token,
            attention_mask=torch.cat([mask, mask.new_ones(3, 1)], dim=1),
            use_cache=True,
            **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
        ).logits[:, -1]
        for row in (0, 2):
            real = int(mask[row].sum())
            alone = model(torch.cat([ids[row : row + 1, -real:], token[row : row + 1]], 1), use_cache=False)
            torch.testing.assert_close(out.logits[row, -real:], alone.logits[0, :-1], **tolerance(model))
            torch.testing.assert_close(step[row], alone.logits[0, -1], **tolerance(model))
        torch.testing.assert_close(
            step[1], model(token[1:2], use_cache=False).logits[0, -1], **tolerance(model)
        )


def test_chunked_prefill_with_an_all_padding_first_chunk_equals_one_pass(model: PreTrainedModel) -> None:
    """A left-padded batch prefilled in chunks, where one row's first chunk is all padding (that row
    holds 3 tokens of 9, the chunks 4 + 3 + 2), gives the one-pass logits at every real token, and
    a decode step after both agrees."""
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[2, :2] = 0
    ids[mask == 0] = 0
    token = torch.randint(3, VOCAB, (3, 1), generator=torch.Generator().manual_seed(8))
    step_mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask, use_cache=True)
        whole_step = model(
            token, attention_mask=step_mask, use_cache=True, **{CACHE_FIELD: getattr(whole, CACHE_FIELD)}
        )
        cache, chunks = None, []
        for start, end in ((0, 4), (4, 7), (7, 9)):
            out = model(
                ids[:, start:end], attention_mask=mask[:, :end], use_cache=True, **{CACHE_FIELD: cache}
            )
            cache = getattr(out, CACHE_FIELD)
            chunks.append(out.logits)
        chunked = torch.cat(chunks, dim=1)
        assert torch.isfinite(chunked).all()
        chunked_step = model(token, attention_mask=step_mask, use_cache=True, **{CACHE_FIELD: cache})
    real = mask.bool()
    torch.testing.assert_close(chunked[real], whole.logits[real], **tolerance(model))
    torch.testing.assert_close(chunked_step.logits, whole_step.logits, **tolerance(model))
