"""What every ttt-mixer causal LM shares: saving with an ``auto_map`` that loads through the installed
package, and the causal-LM head over a decoder (logits, shifted loss, recurrent-cache generation)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from fla.models.utils import Cache
from torch import nn
from transformers import PreTrainedConfig
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from ttt_mixer.models.packing import packed_sequences

# ``save_pretrained`` writes this file beside the weights and names it in the config's auto_map, so
# that ``from_pretrained(path, trust_remote_code=True)`` works in a process that never imported
# ttt_mixer: the file only imports the installed package.
REMOTE_CODE_FILE = "ttt_mixer_remote.py"

# transformers 5.2x renamed the cache of forward, generate and the model outputs from
# ``past_key_values`` to ``cache``; our models take both and answer under the installed name
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# the states one layer of fla's Cache keeps (the keyword arguments of its update)
LEGACY_CACHE_KEYS = ("recurrent_state", "attn_state", "conv_state", "ffn_state")


def cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache given as ``cache=`` or as ``past_key_values=`` (its older name); both is an error."""
    if cache is not None and past_key_values is not None:
        raise ValueError("give the cache as cache= or as past_key_values= (its older name), not both")
    return past_key_values if cache is None else cache


def auto_classes(family: str) -> dict[str, str]:
    """The ``remote_classes`` of a model family: the Auto classes that load ``{family}Config``,
    ``{family}Model`` and ``{family}ForCausalLM``."""
    return {
        "AutoConfig": f"{family}Config",
        "AutoModel": f"{family}Model",
        "AutoModelForCausalLM": f"{family}ForCausalLM",
    }


class RemoteCodeMixin:
    """Adds the auto_map and its remote-code file to ``PreTrainedModel.save_pretrained``.

    Subclasses name the module that defines their classes and the Auto class each one serves.
    """

    remote_module: str
    remote_classes: dict[str, str]

    @classmethod
    def remote_code(cls) -> str:
        names = sorted(set(cls.remote_classes.values()))
        return (
            '"""Loads ttt-mixer\'s classes from the installed package: pip install ttt-mixer."""\n\n'
            f"from {cls.remote_module} import {', '.join(names)}\n\n"
            f"__all__ = {names!r}\n"
        ).replace("'", '"')

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained`` plus the auto_map and its remote-code file."""
        module = REMOTE_CODE_FILE[: -len(".py")]
        self.config.auto_map = {auto: f"{module}.{name}" for auto, name in self.remote_classes.items()}
        super().save_pretrained(save_directory, *args, **kwargs)
        Path(save_directory, REMOTE_CODE_FILE).write_text(self.remote_code())


class CausalLMGenerationMixin(GenerationMixin):
    """A causal LM (list it before the PreTrainedModel base): its decoder, a ``decoder_class`` under
    ``self.decoder_attribute`` that returns hidden states and an fla ``Cache``, the LM head over it,
    and generation that carries that cache. (transformers gives a model a generation config when a
    base's name ends in "GenerationMixin", hence the name.)"""

    decoder_attribute = "model"
    decoder_class: type[PreTrainedModel]
    # the loss is a mean over this batch's targets (no ``num_items_in_batch``): Trainer must scale it
    # for gradient accumulation itself
    accepts_loss_kwargs = False

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__(config)
        setattr(self, self.decoder_attribute, self.decoder_class(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the layers keep fla states, which transformers' DynamicCache cannot hold
        return False

    def get_decoder(self) -> torch.nn.Module:
        return getattr(self, self.decoder_attribute)

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``. A ``cache_implementation`` (static, offloaded, ...) is refused:
        the states live in an fla Cache, which the first forward creates; transformers would only
        warn and ignore the request."""
        config = kwargs.get("generation_config") or self.generation_config
        requested = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if requested is not None:
            raise ValueError(
                f"cache_implementation={requested!r} is not supported: {type(self).__name__} keeps its "
                "recurrent states in an fla Cache; leave cache_implementation unset"
            )
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> dict:
        """transformers' inputs of one generation step, the cache under the installed name."""
        kwargs[CACHE_FIELD] = cache_argument(cache, past_key_values)
        return super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)

    def decoder_inputs(self) -> dict[str, object]:
        """Keyword arguments the decoder takes besides ``forward``'s own (none here)."""
        return {}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        position_ids: torch.LongTensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """The decoder's arguments (and ``decoder_inputs()``), then the causal-LM head
        (``causal_lm_output``)."""
        outputs = self.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            **self.decoder_inputs(),
        )
        return self.causal_lm_output(outputs, labels, shift_labels, return_dict, logits_to_keep)

    def causal_lm_output(
        self,
        decoder_outputs: BaseModelOutputWithPast,
        labels: torch.LongTensor | None,
        shift_labels: torch.LongTensor | None,
        return_dict: bool | None,
        logits_to_keep: int,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits, the next-token loss and the decoder's cache, hidden states and attentions.

        ``labels`` [B, T]: token t + 1 is predicted from tokens <= t; ``shift_labels`` [B, T]: the
        targets already shifted (transformers' keyword for context-parallel training), used instead.
        -100 marks positions without a target."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_states = decoder_outputs.last_hidden_state
        targets = shift_labels
        if targets is None and labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        if targets is not None and targets.shape != hidden_states.shape[:2]:
            name = "shift_labels" if shift_labels is not None else "labels"
            raise ValueError(
                f"{name} must have the input's shape [batch_size, seq_len] = {list(hidden_states.shape[:2])}, "
                f"got {list(targets.shape)}"
            )
        if targets is None and logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten().to(logits.device), ignore_index=-100
            )
        cache = getattr(decoder_outputs, CACHE_FIELD)
        if not return_dict:
            parts = (cache, decoder_outputs.hidden_states, decoder_outputs.attentions)
            output = (logits, *(x for x in parts if x is not None))
            return (loss, *output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=decoder_outputs.hidden_states,
            attentions=decoder_outputs.attentions,
            **{CACHE_FIELD: cache},
        )


class DecoderInputs(NamedTuple):
    """A decoder's checked inputs: the embeddings [B, T, D], the cache to use, whether to return it,
    and the offsets of packed sequences (``cu_seqlens`` [N + 1], given or from ``position_ids``) or
    None for a batch of rows."""

    inputs_embeds: torch.Tensor
    cache: Cache | None
    use_cache: bool
    cu_seqlens: torch.Tensor | None


def decoder_inputs(
    decoder: PreTrainedModel,
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.FloatTensor | None,
    cache: Cache | None,
    use_cache: bool | None,
    attention_layers: list[bool],
    position_ids: torch.LongTensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> DecoderInputs:
    """Checks a decoder's inputs, before any work, and returns them ready to run.

    ``attention_layers[i]``: whether layer i keeps keys and values (else a recurrent state), so that a
    cache from another model is refused rather than read as if it were this one's. A row of
    ``attention_mask`` may be all padding (a left-padded batch prefilled in chunks): its outputs are
    finite and ignored. ``position_ids`` and ``cu_seqlens``: see ``packing.packed_sequences``."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        check_input_ids(input_ids, decoder.config.vocab_size)
        name, shape = "input_ids", input_ids.shape
    else:
        check_inputs_embeds(inputs_embeds, decoder.get_input_embeddings().weight)
        name, shape = "inputs_embeds", inputs_embeds.shape
    if shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sequence (batch_size >= 1), got shape {list(shape)}")
    if shape[1] == 0:
        raise ValueError("input must hold at least one token (seq_len >= 1)")
    if cache is not None and not isinstance(cache, (Cache, list, tuple)):
        raise TypeError(
            "cache must be an fla Cache (fla.models.utils.Cache, as generate and earlier calls return it) "
            f"or None, got {type(cache).__name__}; this model keeps recurrent states, which "
            "transformers' caches (DynamicCache, StaticCache) cannot hold"
        )
    if cache is not None and not isinstance(cache, Cache):
        check_legacy_cache(cache)
        cache = Cache.from_legacy_cache(cache)
    if cache is not None:
        check_cache_fits(cache, attention_layers)
    past_length = cache.get_seq_length() if cache is not None else 0
    cu_seqlens = packed_sequences(position_ids, cu_seqlens, attention_mask, past_length, *shape[:2])
    use_cache = use_cache if use_cache is not None else (decoder.config.use_cache and not decoder.training)
    if use_cache and cache is None:
        cache = Cache()
    if input_ids is not None:
        inputs_embeds = decoder.get_input_embeddings()(input_ids)
    return DecoderInputs(inputs_embeds, cache, use_cache, cu_seqlens)


def check_legacy_cache(cache: list | tuple) -> None:
    """TypeError unless a cache given as a list or tuple is fla's legacy form (``Cache.to_legacy_cache``):
    one dict per layer (or None) of the states fla's cache keeps."""
    for i, entry in enumerate(cache):
        if entry is not None and (not isinstance(entry, dict) or not set(entry) <= set(LEGACY_CACHE_KEYS)):
            got = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise TypeError(
                "a cache given as a list or tuple (past_key_values / cache) must hold, per layer, None or a "
                f"dict of fla's states {LEGACY_CACHE_KEYS} (Cache.to_legacy_cache's form); layer {i} holds {got}"
            )


def is_tracing() -> bool:
    # checks that read values back to the host are skipped under torch.compile / export
    return torch.compiler.is_compiling()


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """TypeError unless ``input_ids`` is an integer tensor [batch_size, seq_len]; ValueError for an
    id outside [0, vocab_size)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        kind = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an integer tensor of token ids [batch_size, seq_len], got {kind}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch_size, seq_len], got {list(input_ids.shape)}")
    if input_ids.numel() and not is_tracing():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size = {vocab_size}), got ids from {low} to {high}"
            )


def check_inputs_embeds(inputs_embeds: torch.Tensor, embedding: torch.Tensor) -> None:
    """ValueError/TypeError unless ``inputs_embeds`` is [batch_size, seq_len, hidden_size] in the
    embedding matrix's dtype."""
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
        raise ValueError("inputs_embeds must be a tensor of shape [batch_size, seq_len, hidden_size]")
    if inputs_embeds.shape[-1] != embedding.shape[-1]:
        raise ValueError(
            f"inputs_embeds last dim must be hidden_size = {embedding.shape[-1]}, got {inputs_embeds.shape[-1]}"
        )
    if inputs_embeds.dtype != embedding.dtype:
        raise TypeError(
            f"inputs_embeds must have the model's dtype {embedding.dtype}, got {inputs_embeds.dtype}"
        )


def check_cache_fits(cache: Cache, attention_layers: list[bool]) -> None:
    """ValueError unless ``cache`` is empty or holds this model's layers: as many, attention states
    where the model has attention and recurrent states elsewhere."""
    if len(cache) == 0:
        return
    if len(cache) != len(attention_layers):
        raise ValueError(
            f"the cache holds {len(cache)} layers but the model has {len(attention_layers)}: it comes from another model"
        )
    for i, (entry, attention) in enumerate(zip(cache, attention_layers, strict=True)):
        entry = entry or {}
        if (attention and entry.get("recurrent_state") is not None) or (
            not attention and entry.get("attn_state") is not None
        ):
            held, expected = (
                ("a recurrent state", "attention") if attention else ("keys and values", "recurrent")
            )
            raise ValueError(
                f"the cache's layer {i} holds {held} but layer {i} of the model is {expected}: it comes from another model"
            )


def decoder_output(
    decoder: PreTrainedModel,
    hidden_states: torch.Tensor,
    cache: Cache | None,
    use_cache: bool,
    all_hidden_states: tuple[torch.Tensor, ...] | None,
    all_attentions: tuple[torch.Tensor | None, ...] | None,
    return_dict: bool | None,
) -> BaseModelOutputWithPast | tuple:
    """A decoder's result: the cache only with ``use_cache``; a tuple of the parts that are not None
    unless ``return_dict`` (default: the config's) asks for the output class."""
    cache = cache if use_cache else None
    if not (return_dict if return_dict is not None else decoder.config.return_dict):
        parts = (hidden_states, cache, all_hidden_states, all_attentions)
        return tuple(x for x in parts if x is not None)
    return BaseModelOutputWithPast(
        last_hidden_state=hidden_states,
        hidden_states=all_hidden_states,
        attentions=all_attentions,
        **{CACHE_FIELD: cache},
    )
