"""Conversion from the authors' checkpoint layout (ttt-lm-pytorch, docs/conventions.md sections 1-3)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ttt_mixer.models import TTTConfig, TTTForCausalLM

# their TTTConfig fields that carry over as they are
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mini_batch_size",
    "ttt_layer_type",
    "ttt_base_lr",
    "pre_conv",
    "share_qk",
    "use_gate",
    "conv_kernel",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "max_position_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
)
# fields of theirs that do not change the function the model computes
IGNORED_CONFIG_FIELDS = (
    "hidden_act",
    "pretraining_tp",
    "use_cache",
    "scan_checkpoint_group_size",
    "model_type",
)
# our parameter name -> theirs, inside one layer (``{i}`` is the layer index)
LAYER_KEYS = {
    "model.layers.{i}.attn_norm.weight": "layers.{i}.seq_norm.weight",
    "model.layers.{i}.mlp_norm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down_proj.weight",
    "model.layers.{i}.pre_conv.norm.weight": "layers.{i}.conv.norm.weight",
    "model.layers.{i}.pre_conv.conv.weight": "layers.{i}.conv.conv.weight",
    "model.layers.{i}.pre_conv.conv.bias": "layers.{i}.conv.conv.bias",
    "model.layers.{i}.attn.q_proj.weight": "layers.{i}.seq_modeling_block.q_proj.weight",
    "model.layers.{i}.attn.k_proj.weight": "layers.{i}.seq_modeling_block.k_proj.weight",
    "model.layers.{i}.attn.v_proj.weight": "layers.{i}.seq_modeling_block.v_proj.weight",
    "model.layers.{i}.attn.o_proj.weight": "layers.{i}.seq_modeling_block.o_proj.weight",
    "model.layers.{i}.attn.g_proj.weight": "layers.{i}.seq_modeling_block.g_proj.weight",
    "model.layers.{i}.attn.q_conv1d.weight": "layers.{i}.seq_modeling_block.conv_q.weight",
    "model.layers.{i}.attn.q_conv1d.bias": "layers.{i}.seq_modeling_block.conv_q.bias",
    "model.layers.{i}.attn.k_conv1d.weight": "layers.{i}.seq_modeling_block.conv_k.weight",
    "model.layers.{i}.attn.k_conv1d.bias": "layers.{i}.seq_modeling_block.conv_k.bias",
    "model.layers.{i}.attn.lr_proj.weight": "layers.{i}.seq_modeling_block.learnable_ttt_lr_weight",
    "model.layers.{i}.attn.lr_proj.bias": "layers.{i}.seq_modeling_block.learnable_ttt_lr_bias",
    "model.layers.{i}.attn.token_offset": "layers.{i}.seq_modeling_block.learnable_token_idx",
    "model.layers.{i}.attn.ttt_norm_weight": "layers.{i}.seq_modeling_block.ttt_norm_weight",
    "model.layers.{i}.attn.ttt_norm_bias": "layers.{i}.seq_modeling_block.ttt_norm_bias",
    "model.layers.{i}.attn.post_norm.weight": "layers.{i}.seq_modeling_block.post_norm.weight",
    "model.layers.{i}.attn.post_norm.bias": "layers.{i}.seq_modeling_block.post_norm.bias",
    "model.layers.{i}.attn.w1": "layers.{i}.seq_modeling_block.W1",
    "model.layers.{i}.attn.b1": "layers.{i}.seq_modeling_block.b1",
    "model.layers.{i}.attn.w2": "layers.{i}.seq_modeling_block.W2",
    "model.layers.{i}.attn.b2": "layers.{i}.seq_modeling_block.b2",
}
MODEL_KEYS = {
    "model.embeddings.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


# their tensors that carry one extra size-1 axis: inner biases [H, 1, d], the lr gate's weight
# [H, 1, D] (some write [H, D, 1]; both are accepted, docs/conventions.md section 1) and bias [H, 1]
SINGLETON_AXIS_KEYS = ("attn.b1", "attn.b2", "attn.lr_proj.weight", "attn.lr_proj.bias")


def _drops_one_singleton_axis(shape: torch.Size, target: torch.Size) -> bool:
    return any(shape[axis] == 1 and shape[:axis] + shape[axis + 1 :] == target for axis in range(len(shape)))


def config_from_ttt_lm_pytorch(config: Mapping) -> TTTConfig:
    """Our TTTConfig from a dict of their TTTConfig fields (config.json of their checkpoints)."""
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config must be a dict of their TTTConfig fields (their config.json), got {type(config).__name__}"
        )
    unknown = sorted(set(config) - set(CONFIG_FIELDS) - set(IGNORED_CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"config has fields the converter does not know: {unknown}")
    fields = {k: config[k] for k in CONFIG_FIELDS if k in config}
    return TTTConfig(**fields)


def _their_key(ours: str, layer: int) -> str:
    template = next(t for o, t in LAYER_KEYS.items() if o.format(i=layer) == ours)
    return template.format(i=layer)


def from_ttt_lm_pytorch(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> TTTForCausalLM:
    """Build a ``TTTForCausalLM`` that computes what the authors' model computes.

    Args:
        state_dict: their TTTModel's keys, or their TTTForCausalLM's (with a ``model.`` prefix).
        config: their TTTConfig fields as a dict.

    The model takes the checkpoint's floating dtype (as ``from_pretrained`` with ``dtype="auto"``),
    the widest one if they differ: no tensor loses precision.

    Raises:
        TypeError: config or state_dict not a mapping, a value that is no floating torch.Tensor
            (named).
        ValueError: a missing or unexpected key, or a tensor of the wrong shape (all named).
    """
    dtype = checkpoint_dtype(state_dict)
    ours = TTTForCausalLM(config_from_ttt_lm_pytorch(config)).to(dtype)
    theirs = {k.removeprefix("model."): v for k, v in state_dict.items()}
    expected = ours.state_dict()
    mapping = {}
    for key in expected:
        if key in MODEL_KEYS:
            if key == "lm_head.weight" and ours.config.tie_word_embeddings:
                continue
            mapping[key] = MODEL_KEYS[key]
        else:
            layer = int(key.split(".")[2])
            mapping[key] = _their_key(key, layer)
    missing = sorted(t for t in mapping.values() if t not in theirs)
    unexpected = sorted(set(theirs) - set(mapping.values()))
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not fit the config: missing keys {missing}, unexpected keys {unexpected}"
        )

    converted, wrong = {}, []
    for key, their_key in mapping.items():
        tensor = theirs[their_key]
        target = expected[key].shape
        if key.endswith(SINGLETON_AXIS_KEYS) and _drops_one_singleton_axis(tensor.shape, target):
            tensor = tensor.reshape(target)
        if tensor.shape != target:
            wrong.append(f"{their_key}: {list(tensor.shape)} (expected {list(target)})")
        converted[key] = tensor
    if wrong:
        raise ValueError(f"state_dict tensors of the wrong shape: {wrong}")
    ours.load_state_dict(converted, strict=not ours.config.tie_word_embeddings)
    if ours.config.tie_word_embeddings:
        ours.tie_weights()
    return ours.eval()


def checkpoint_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype a model takes from ``state_dict``: its tensors' floating dtype, the widest of them if
    they differ; TypeError naming the keys of values that are no floating tensor."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of their tensors by key, got {type(state_dict).__name__}")
    not_tensors = [
        f"{key} ({type(value).__name__})"
        for key, value in state_dict.items()
        if not isinstance(value, torch.Tensor)
    ]
    if not_tensors:
        raise TypeError(f"state_dict values must be torch.Tensor, got {not_tensors}")
    not_floating = [
        f"{key} ({value.dtype})" for key, value in state_dict.items() if not value.is_floating_point()
    ]
    if not_floating:
        raise TypeError(f"state_dict tensors must be floating point, got {not_floating}")
    # the widest of the checkpoint's dtypes: no tensor loses precision on loading
    dtypes = [value.dtype for value in state_dict.values()]
    return functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32


def load_ttt_lm_pytorch_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read their checkpoint folder: config.json and model.safetensors or pytorch_model.bin."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json")
    config = json.loads(config_file.read_text())
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors"), config
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True), config
    raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
