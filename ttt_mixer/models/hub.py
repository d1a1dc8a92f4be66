"""What every ttt-mixer causal LM shares: saving with an ``auto_map`` that loads through the installed
package, and the causal-LM head over a decoder (logits, shifted loss, recurrent-cache generation)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from fla.models.cache_utils import Cache
from fla.models.generation_utils import FLAGenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

# ``save_pretrained`` writes this file beside the weights and names it in the config's auto_map, so
# that ``from_pretrained(path, trust_remote_code=True)`` works in a process that never imported
# ttt_mixer: the file only imports the installed package.
REMOTE_CODE_FILE = "ttt_mixer_remote.py"


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


class CausalLMGenerationMixin(FLAGenerationMixin):
    """``forward`` of a causal LM (list it before the PreTrainedModel base) whose decoder (``self.decoder_attribute``) returns hidden states and
    an fla ``Cache``; generation goes through fla's mixin, which keeps that cache. (transformers gives a
    model a generation config when a base's name ends in "GenerationMixin", hence the name.)"""

    decoder_attribute = "model"
    # the loss is a mean over this batch's targets (no ``num_items_in_batch``): Trainer must scale it
    # for gradient accumulation itself
    accepts_loss_kwargs = False

    def get_decoder(self) -> torch.nn.Module:
        return getattr(self, self.decoder_attribute)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        past_key_values=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if labels is None and logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            # predict token t + 1 from tokens <= t; -100 marks positions without a target
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        if not return_dict:
            output = (logits, *(x for x in (outputs.past_key_values, outputs.hidden_states) if x is not None))
            return (loss, *output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


def decoder_inputs(
    decoder: PreTrainedModel,
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.FloatTensor | None,
    past_key_values: Cache | None,
    use_cache: bool | None,
) -> tuple[torch.Tensor, Cache | None, bool]:
    """Checks a decoder's inputs and returns (embeddings [B, T, D], the cache to use, use_cache)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch_size, seq_len], got {list(input_ids.shape)}")
    if inputs_embeds is None:
        inputs_embeds = decoder.get_input_embeddings()(input_ids)
    if inputs_embeds.shape[1] == 0:
        raise ValueError("input must hold at least one token (seq_len >= 1)")
    use_cache = use_cache if use_cache is not None else (decoder.config.use_cache and not decoder.training)
    if use_cache and not isinstance(past_key_values, Cache):
        past_key_values = Cache.from_legacy_cache(past_key_values)
    return inputs_embeds, past_key_values, use_cache


def decoder_output(
    decoder: PreTrainedModel,
    hidden_states: torch.Tensor,
    past_key_values: Cache | None,
    use_cache: bool,
    all_hidden_states: tuple[torch.Tensor, ...] | None,
    return_dict: bool | None,
) -> BaseModelOutputWithPast | tuple:
    """A decoder's result: the cache only with ``use_cache``; a tuple of the parts that are not None
    unless ``return_dict`` (default: the config's) asks for the output class."""
    past_key_values = past_key_values if use_cache else None
    if not (return_dict if return_dict is not None else decoder.config.return_dict):
        return tuple(x for x in (hidden_states, past_key_values, all_hidden_states) if x is not None)
    return BaseModelOutputWithPast(
        last_hidden_state=hidden_states, past_key_values=past_key_values, hidden_states=all_hidden_states
    )
