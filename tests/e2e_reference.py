"""Runs the authors' TTT-E2E code (JAX, github test-time-training/e2e) for the parity test.

Their checkout is named by the environment variable ``TTT_E2E_REPO`` and is never part of this
repository; its modules are imported as they are, except for two rewrites that let Python 3.11
read them (they target 3.12): a generic function ``def f[T: Bound](...)`` becomes ``def f(...)``
after ``T = TypeVar("T")``, and ``typing.override`` comes from ``typing_extensions``.

Needs, beside torch: jax and jaxlib 0.5.3, equinox 0.12.1, optax 0.2.4, orbax-checkpoint 0.11.13,
einops, jaxtyping, hydra-core, chex and grain (their lock's versions; ``scripts/setup_e2e_reference.sh``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
from pathlib import Path

import numpy as np

REPO_ENV = "TTT_E2E_REPO"
GENERIC_DEF = re.compile(r"^(?P<indent>[ \t]*)def (?P<name>\w+)\[(?P<params>[^\]]*)\]\(", re.MULTILINE)


def python311_source(source: str) -> str:
    """Their source with the two rewrites described in the module docstring."""

    def without_type_params(match: re.Match) -> str:
        names = [part.split(":")[0].strip() for part in match["params"].split(",")]
        indent = match["indent"]
        declared = "".join(f'{indent}{name} = __import__("typing").TypeVar("{name}")\n' for name in names)
        return f"{declared}{indent}def {match['name']}("

    source = GENERIC_DEF.sub(without_type_params, source)
    return source.replace("from typing import override", "from typing_extensions import override")


class TheirModules(importlib.abc.MetaPathFinder, importlib.abc.SourceLoader):
    """Finds ``ttt`` and ``ttt.*`` in their checkout and loads them through ``python311_source``."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname != "ttt" and not fullname.startswith("ttt."):
            return None
        base = self.repo.joinpath(*fullname.split("."))
        if (base / "__init__.py").exists():
            return importlib.util.spec_from_file_location(
                fullname, base / "__init__.py", loader=self, submodule_search_locations=[str(base)]
            )
        if base.with_suffix(".py").exists():
            return importlib.util.spec_from_file_location(fullname, base.with_suffix(".py"), loader=self)
        if base.is_dir():  # a namespace package (their ``ttt`` has no __init__.py)
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = [str(base)]
            return spec
        return None

    def get_filename(self, fullname: str) -> str:
        base = self.repo.joinpath(*fullname.split("."))
        return str(base / "__init__.py" if base.is_dir() else base.with_suffix(".py"))

    def get_data(self, path: str) -> bytes:
        return python311_source(Path(path).read_text()).encode()

    def path_stats(self, path: str) -> dict:
        raise OSError("no bytecode cache for rewritten sources")


def reference_repo() -> Path | None:
    """Their checkout (``TTT_E2E_REPO``), or None when unset or not a checkout of theirs."""
    repo = os.environ.get(REPO_ENV)
    if not repo or not Path(repo, "ttt", "model", "transformer.py").exists():
        return None
    return Path(repo)


def import_their_code(repo: Path) -> None:
    if not any(isinstance(finder, TheirModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, TheirModules(repo))


def flatten(tree: object, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict / module of arrays as {dotted path: array} (tuple items by index)."""
    import jax

    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = []
        for key in path:
            for attr in ("name", "key", "idx"):
                if hasattr(key, attr):
                    keys.append(str(getattr(key, attr)))
                    break
        flat[prefix + ".".join(keys)] = np.asarray(leaf)
    return flat


def run_reference(
    repo: Path,
    model_options: dict,
    tokens: np.ndarray,
    inner_lr: float,
    inner_clip_gradient: float,
    checkpoint_dir: Path,
    seed: int = 0,
) -> dict:
    """Builds their MetaModel (float32 throughout), sets every RMSNorm weight to a random value near
    1 (so that a norm converted to the wrong place shows), runs their meta-learning loss on each
    row of ``tokens`` [B, T + 1] (inputs [:, :-1], targets [:, 1:]) and its gradient, and saves the
    model with their ``Checkpointer`` (step 1) under ``checkpoint_dir``.

    Returns their logits [B, T, V] (read from the meta forward: ``token_log_probs``, used only for a
    metric, is replaced by the identity), the loss (mean over rows) and the gradients of every weight
    {dotted path: array}."""
    import_their_code(repo)
    import equinox as eqx
    import grain.python as grain
    import jax
    import jax.numpy as jnp
    import optax

    jax.config.update("jax_default_matmul_precision", "highest")
    from ttt import config as their_config
    from ttt.infra.checkpoint import Checkpointer
    from ttt.model import attention, transformer
    from ttt.model.data import Batch

    length = tokens.shape[1] - 1
    model_config = their_config.ModelConfig(
        compute_dtype="fp32", param_dtype="fp32", state_dtype="fp32", seq_len=length, **model_options
    )
    training = their_config.TrainingConfig(
        train_mode="meta",
        seq_length=length,
        spec_inner=["language_model.**.suffix_blocks.feed_forward_prime.**"],
        optimizer_inner=their_config.SGDOptimizerConfig(lr=inner_lr, clip_gradient=inner_clip_gradient),
        ilr_warmup_steps=0,
    )
    checkpoint = their_config.CheckpointConfig(checkpoint_dir=str(checkpoint_dir))
    config = their_config.Config(training=training, model=model_config, checkpoint=checkpoint)
    model, state = eqx.nn.make_with_state(transformer.MetaModel)(config, key=jax.random.PRNGKey(seed))
    norm_key = [jax.random.PRNGKey(seed + 1)]

    def randomised_norm(path: tuple, leaf: object) -> object:
        names = [str(getattr(key, "name", "")) for key in path]
        if any("norm" in name for name in names) and names[-1] == "weight":
            norm_key[0], key = jax.random.split(norm_key[0])
            return leaf + 0.2 * jax.random.normal(key, leaf.shape, leaf.dtype)
        return leaf

    model = jax.tree_util.tree_map_with_path(randomised_norm, model)
    # the logits, through the metric that would hold the target's log-probability
    transformer.token_log_probs = lambda logits, targets: -logits
    # their attention asks for cuDNN's kernel, a GPU's; on the CPU, XLA's computes the same attention
    gpu_attention = jax.nn.dot_product_attention

    def cpu_attention(*args: object, implementation: str | None = None, **kwargs: object) -> object:
        return gpu_attention(*args, implementation=None, **kwargs)

    attention.jax.nn.dot_product_attention = cpu_attention

    def sequence_loss(meta_model: object, row: np.ndarray) -> tuple:
        ids = jnp.asarray(row, dtype=jnp.int32)
        seq = Batch(
            input_ids=ids[:-1], target_tokens=ids[1:], loss_masks=ids[1:] != model_config.bos_token_id
        )
        return meta_model.loss_for_sequence(seq, state)

    logits, losses, grads = [], [], []
    mesh = jax.make_mesh(axis_shapes=(1, 1), axis_names=("data", "state"))
    with mesh:
        for row in tokens:
            (loss, metrics), grad = eqx.filter_value_and_grad(sequence_loss, has_aux=True)(model, row)
            logits.append(np.asarray(metrics[transformer.MetaModel.MetricType.token_nll_loss]))
            losses.append(float(loss))
            grads.append(flatten(eqx.filter(grad, eqx.is_inexact_array)))
    mean_grads = {name: np.mean([g[name] for g in grads], axis=0) for name in grads[0]}

    outer = optax.adamw(1e-3)
    opt_state = outer.init(model.trainable_parameters())
    source = grain.MapDataset.source(np.zeros((4, 2), dtype=np.int32))
    checkpointer = Checkpointer(config, for_saving=True)
    checkpointer.save_checkpoint(1, model, opt_state, source.to_iter_dataset().__iter__(), is_milestone=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return {"logits": np.stack(logits), "loss": float(np.mean(losses)), "grads": mean_grads}
