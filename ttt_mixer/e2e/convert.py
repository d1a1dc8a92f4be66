"""Conversion from the TTT-E2E authors' checkpoints (JAX, github test-time-training/e2e) to
``E2EForCausalLM`` (docs/conventions.md section 7).

Their ``Checkpointer`` saves ``MetaModel.weights()`` with orbax under ``<experiment>/<step>/model_weights``
(the released checkpoints hold that part only). Reading it needs ``orbax-checkpoint`` (and so JAX);
mapping the arrays needs neither: ``e2e_state_dict`` takes them as {dotted path: array}.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ttt_mixer.e2e.configuration_e2e import E2EConfig
from ttt_mixer.e2e.modeling_e2e import E2EForCausalLM

MODEL = "language_model.model."
BLOCKS = MODEL + "h.blocks."
PRIME = MODEL + "h.prime_storage."
# every block's arrays (stacked over layers, [L, ...]): theirs -> ours under model.layers.N.; their
# linear weights are [in, out], ours [out, in]
BLOCK_KEYS = {
    "seq_modeling_block.wq.weight": "attn.q_proj.weight",
    "seq_modeling_block.wk.weight": "attn.k_proj.weight",
    "seq_modeling_block.wv.weight": "attn.v_proj.weight",
    "seq_modeling_block.wo.weight": "attn.o_proj.weight",
    "seq_modeling_block.q_norm.weight": "attn.q_norm.weight",
    "seq_modeling_block.k_norm.weight": "attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "seq_norm.weight": "attn_norm.weight",
    "seq_post_norm.weight": "attn_post_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_post_norm.weight": "mlp_post_norm.weight",
}
# the suffix blocks' inner MLPs and their norms (stacked over the suffix_len blocks)
PRIME_KEYS = {
    "feed_forward_prime.w1.weight": "feed_forward_prime.gate_proj.weight",
    "feed_forward_prime.w3.weight": "feed_forward_prime.up_proj.weight",
    "feed_forward_prime.w2.weight": "feed_forward_prime.down_proj.weight",
    "ffn_prime_norm.weight": "feed_forward_prime_norm.weight",
    "ffn_prime_post_norm.weight": "feed_forward_prime_post_norm.weight",
}
TOP_KEYS = {
    MODEL + "wte.weight": "model.embeddings.weight",
    MODEL + "ln_f.weight": "model.norm.weight",
    "language_model.lm_head.weight": "lm_head.weight",
}
# The settings of their released checkpoints (125M, 1B, 3B; their configs/experiment/*-e2e*.yaml),
# which the arrays do not hold; the sizes come from the arrays' shapes
RELEASED_SETTINGS = {
    "mini_batch_size": 1024,
    "sliding_window_size": 8192,
    "rope_theta": 500000.0,
    "inner_lr": 1.0,
    "inner_clip_gradient": 1.0,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def e2e_config(params: Mapping[str, np.ndarray], **settings: object) -> E2EConfig:
    """The ``E2EConfig`` of their arrays: sizes from the shapes (heads from the QK-norm's width),
    ``tie_word_embeddings`` from whether ``lm_head`` is present, the rest ``RELEASED_SETTINGS``
    overridden by ``settings`` (any ``E2EConfig`` field)."""
    for key in (
        MODEL + "wte.weight",
        BLOCKS + "seq_modeling_block.q_norm.weight",
        BLOCKS + "feed_forward.w1.weight",
    ):
        if key not in params:
            raise ValueError(f"not a TTT-E2E checkpoint of the authors' code: it has no {key!r}")
    vocab_size, hidden_size = params[MODEL + "wte.weight"].shape
    layers, head_dim = params[BLOCKS + "seq_modeling_block.q_norm.weight"].shape
    prime = params.get(PRIME + "feed_forward_prime.w1.weight")
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": params[BLOCKS + "feed_forward.w1.weight"].shape[2],
        "num_hidden_layers": layers,
        "num_attention_heads": hidden_size // head_dim,
        "suffix_len": 0 if prime is None else prime.shape[0],
        "tie_word_embeddings": "language_model.lm_head.weight" not in params,
    }
    return E2EConfig(**{**sizes, **RELEASED_SETTINGS, **settings})


def e2e_state_dict(params: Mapping[str, np.ndarray], config: E2EConfig) -> dict[str, torch.Tensor]:
    """Their arrays {dotted path: array} as ``E2EForCausalLM``'s state dict (also maps gradients).

    Norms that ``config`` switches off (``pre_norm``, ``post_norm``, ``qk_norm``) are dropped, as their
    model leaves them unused; the initial attention states (``kv_cache_index``) are not weights.
    ValueError names every missing or unexpected array."""
    first_suffix = config.num_hidden_layers - config.suffix_len
    unused = set()
    if not config.pre_norm:
        unused |= {"attn_norm.weight", "mlp_norm.weight", "feed_forward_prime_norm.weight"}
    if not config.post_norm:
        unused |= {"attn_post_norm.weight", "mlp_post_norm.weight", "feed_forward_prime_post_norm.weight"}
    if not config.qk_norm:
        unused |= {"attn.q_norm.weight", "attn.k_norm.weight"}
    out, unexpected = {}, []
    for key, value in params.items():
        value = np.asarray(value)
        if "kv_cache_index" in key:
            continue
        if key in TOP_KEYS:
            ours = TOP_KEYS[key]
            out[ours] = value.T if ours == "lm_head.weight" else value
        elif key.startswith(BLOCKS) and key[len(BLOCKS) :] in BLOCK_KEYS:
            ours = BLOCK_KEYS[key[len(BLOCKS) :]]
            for layer, array in enumerate(value):
                out[f"model.layers.{layer}.{ours}"] = array.T if array.ndim == 2 else array
        elif key.startswith(PRIME) and key[len(PRIME) :] in PRIME_KEYS:
            ours = PRIME_KEYS[key[len(PRIME) :]]
            for j, array in enumerate(value):
                out[f"model.layers.{first_suffix + j}.{ours}"] = array.T if array.ndim == 2 else array
        else:
            unexpected.append(key)
    if config.tie_word_embeddings:
        if "lm_head.weight" in out:
            unexpected.append("language_model.lm_head.weight (the config ties the head to wte)")
        out.pop("lm_head.weight", None)
    out = {
        key: torch.from_numpy(np.array(as_float(value)))
        for key, value in out.items()
        if key.split(".", 3)[-1] not in unused
    }
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    wrong = sorted(
        f"{key} {list(out[key].shape)} (expected {expected[key]})"
        for key in set(out) & set(expected)
        if list(out[key].shape) != expected[key]
    )
    if unexpected or missing or extra or wrong:
        raise ValueError(
            "the arrays do not fit the config: "
            + "; ".join(
                f"{label}: {', '.join(items)}"
                for label, items in (
                    ("unexpected", unexpected),
                    ("missing", missing),
                    ("beyond the config's layers", extra),
                    ("wrong shapes", wrong),
                )
                if items
            )
        )
    return out


def as_float(array: np.ndarray) -> np.ndarray:
    """float64/32/16 arrays as they are; others (bfloat16, which numpy lacks) as float32."""
    return array if array.dtype in (np.float64, np.float32, np.float16) else array.astype(np.float32)


def expected_shapes(config: E2EConfig) -> dict[str, list[int]]:
    """The shape of every array of ``E2EForCausalLM(config)``'s state dict (the head only untied)."""
    with torch.device("meta"):
        model = E2EForCausalLM(config)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def from_e2e_params(
    params: Mapping[str, np.ndarray], config: E2EConfig | None = None, **settings: object
) -> E2EForCausalLM:
    """``E2EForCausalLM`` (eval mode, float32 unless the arrays are float64) computing what their
    model computes, from their arrays {dotted path: array}; ``config`` defaults to
    ``e2e_config(params, **settings)``."""
    if config is None:
        config = e2e_config(params, **settings)
    elif settings:
        raise ValueError("give a config or settings, not both")
    state = e2e_state_dict(params, config)
    model = E2EForCausalLM(config).to(next(iter(state.values())).dtype)
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model.eval()


def model_weights_folder(path: str | Path) -> Path:
    """The orbax folder of the model's arrays: ``path`` itself, its ``model_weights``, or that of
    its latest step (their experiment folder holds one folder per saved step)."""
    path = Path(path)
    if (path / "_METADATA").exists():
        return path
    if (path / "model_weights").is_dir():
        return path / "model_weights"
    steps = (
        [p for p in path.iterdir() if p.name.isdigit() and (p / "model_weights").is_dir()]
        if path.is_dir()
        else []
    )
    if not steps:
        raise FileNotFoundError(
            f"{path}: not a checkpoint of the authors' code (expected <step>/model_weights, model_weights "
            "or an orbax folder with _METADATA)"
        )
    return max(steps, key=lambda p: int(p.name)) / "model_weights"


def flatten_tree(tree: object, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts and lists of arrays as {dotted path: numpy array}; None leaves are dropped."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    elif tree is None:
        return {}
    else:
        return {prefix[:-1]: np.asarray(tree)}
    flat = {}
    for key, value in items:
        flat.update(flatten_tree(value, f"{prefix}{key}."))
    return flat


def read_e2e_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Their saved arrays {dotted path: array} (``model_weights_folder(path)``), read with orbax."""
    folder = model_weights_folder(path)
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            "reading the TTT-E2E authors' checkpoints (orbax) needs orbax-checkpoint: "
            "pip install orbax-checkpoint"
        ) from None
    return flatten_tree(ocp.StandardCheckpointer().restore(folder.resolve()))


def load_e2e_checkpoint(path: str | Path, **settings: object) -> E2EForCausalLM:
    """``from_e2e_params`` on the arrays of their checkpoint at ``path`` (``model_weights_folder``)."""
    return from_e2e_params(read_e2e_checkpoint(path), **settings)
