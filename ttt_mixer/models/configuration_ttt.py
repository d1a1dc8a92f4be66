from __future__ import annotations

import difflib
import inspect

from transformers.configuration_utils import PretrainedConfig

from ttt_mixer.layers.checks import check_bool, check_int, check_positive_float
from ttt_mixer.layers.ttt import check_layer_options
from ttt_mixer.layers.ttt_family import FAMILY_PRESETS, check_family_layer_options
from ttt_mixer.ops.ttt.spec import INNER_MODELS

BACKBONES = ("transformer", "mamba")
# the paper's two block layouts (docs/math.md section 9); explicit flags override them
BACKBONE_DEFAULTS = {
    "transformer": {"pre_conv": False, "share_qk": False, "use_gate": False},
    "mamba": {"pre_conv": True, "share_qk": True, "use_gate": True},
}


# TTTLayer's option -> the field of this config that sets it
LAYER_OPTION_FIELDS = {
    "num_heads": "num_attention_heads",
    "base_lr": "ttt_base_lr",
    "conv_size": "conv_kernel",
    "norm_eps": "ttt_norm_eps",
    "preset": "ttt_preset",
}
# what transformers itself writes into or hands to any config (from_pretrained's valid_fields), beyond
# PretrainedConfig's own fields
TRANSFORMERS_FIELDS = {
    "auto_map",
    "name_or_path",
    "num_labels",
    "attn_implementation",
    "_attn_implementation",
    "experts_implementation",
    "torch_dtype",
    "use_return_dict",
    # transformers up to 5.17 hands it to the config when loading a checkpoint
    "_commit_hash",
}


def reject_unknown_fields(owner: str, kwargs: dict, known: object) -> None:
    """TypeError naming every field of ``kwargs`` that neither this config (``known``) nor
    transformers' PretrainedConfig knows, with the closest known name: transformers would store
    it silently, and a misspelt field would then be ignored."""
    generic = set(PretrainedConfig().to_dict()) | set(inspect.signature(PretrainedConfig.__init__).parameters)
    allowed = set(known) | generic | TRANSFORMERS_FIELDS
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        hints = [
            f"{name!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(name, allowed, 1))
            else repr(name)
            for name in unknown
        ]
        raise TypeError(f"{owner} got unknown field(s) {', '.join(hints)}")


class TTTConfig(PretrainedConfig):
    """Configuration of a TTT language model (``TTTModel``, ``TTTForCausalLM``).

    Field names follow the authors' TTTConfig (docs/conventions.md sections 1-3), so their configs load as they are;
    ``backbone`` picks the Transformer or Mamba block layout, whose flags (``pre_conv``, ``share_qk``,
    ``use_gate``) can still be set one by one. ``ttt_preset`` ("titans" or "lact"; None: the paper's
    TTT of ``ttt_layer_type``) puts a member of the TTT family in every block (docs/math.md section 13);
    ``window_size`` (LaCT's sliding-window attention), ``use_muon`` (LaCT's orthogonalised update) and
    ``use_short_conv`` (LaCT's q, k, v through short convolutions) belong to LaCT,
    ``memory_residual_norm`` (Titans' memory as k + LN(MLP(k))) to Titans.
    """

    model_type = "ttt_mixer"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5504,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 32,
        mini_batch_size: int = 16,
        ttt_layer_type: str = "linear",
        ttt_base_lr: float | None = None,
        ttt_preset: str | None = None,
        window_size: int | None = None,
        use_muon: bool = False,
        use_short_conv: bool = False,
        memory_residual_norm: bool = False,
        backbone: str = "transformer",
        pre_conv: bool | None = None,
        share_qk: bool | None = None,
        use_gate: bool | None = None,
        conv_kernel: int = 4,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        ttt_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 2048,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        if ttt_layer_type not in INNER_MODELS:
            raise ValueError(f"ttt_layer_type must be one of {INNER_MODELS}, got {ttt_layer_type!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        reject_unknown_fields(type(self).__name__, kwargs, inspect.signature(type(self).__init__).parameters)
        for name, value in (
            ("vocab_size", vocab_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
        ):
            check_int(name, value)
        check_positive_float("rms_norm_eps", rms_norm_eps)
        defaults = BACKBONE_DEFAULTS[backbone]
        flags = {
            name: defaults[name] if value is None else value
            for name, value in (("pre_conv", pre_conv), ("share_qk", share_qk), ("use_gate", use_gate))
        }
        check_bool("pre_conv", flags["pre_conv"])
        check_layer_options(
            {
                "hidden_size": hidden_size,
                "num_heads": num_attention_heads,
                "mini_batch_size": mini_batch_size,
                "base_lr": ttt_base_lr,
                "share_qk": flags["share_qk"],
                "conv_size": conv_kernel,
                "use_gate": flags["use_gate"],
                "use_rope": use_rope,
                "rope_theta": rope_theta,
                "norm_eps": ttt_norm_eps,
            },
            names=LAYER_OPTION_FIELDS,
        )
        if ttt_preset is not None:
            check_family_layer_options(
                {
                    "preset": ttt_preset,
                    "hidden_size": hidden_size,
                    "num_heads": num_attention_heads,
                    "mini_batch_size": mini_batch_size,
                    "base_lr": ttt_base_lr,
                    "conv_size": conv_kernel,
                    "window_size": window_size,
                    "use_muon": use_muon,
                    "use_short_conv": use_short_conv,
                    "memory_residual_norm": memory_residual_norm,
                    "rope_theta": rope_theta,
                    "norm_eps": ttt_norm_eps,
                },
                names=LAYER_OPTION_FIELDS,
            )
        elif window_size is not None or use_muon or use_short_conv or memory_residual_norm:
            raise ValueError(
                "window_size, use_muon and use_short_conv belong to ttt_preset 'lact', "
                f"memory_residual_norm to 'titans' (of {FAMILY_PRESETS})"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mini_batch_size = mini_batch_size
        self.ttt_layer_type = ttt_layer_type
        self.ttt_base_lr = ttt_base_lr
        self.ttt_preset = ttt_preset
        self.window_size = window_size
        self.use_muon = use_muon
        self.use_short_conv = use_short_conv
        self.memory_residual_norm = memory_residual_norm
        self.backbone = backbone
        self.pre_conv = flags["pre_conv"]
        self.share_qk = flags["share_qk"]
        self.use_gate = flags["use_gate"]
        self.conv_kernel = conv_kernel
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.ttt_norm_eps = ttt_norm_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
