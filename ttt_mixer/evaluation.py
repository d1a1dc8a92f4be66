"""``ttt-mixer eval``: lm-eval's own command line, with ttt_mixer imported and its task folder included.

Importing ttt_mixer registers ``TTTConfig`` and ``TTTForCausalLM`` with the transformers Auto
classes, so ``--model hf --model_args pretrained=PATH`` loads a ttt-mixer checkpoint without
``trust_remote_code``; ``ttt_mixer.eval_tasks`` (the ``ttt_recall`` tasks) is added to the task
folders, after any ``--include_path`` the user gives. Every other argument reaches lm-eval's CLI
(``lm_eval.__main__.cli_evaluate``) unchanged.

lm-eval's ``--include_path`` takes a single folder. When the user names one too, the two are passed
to ``lm-eval run`` as a list through a temporary ``--config`` YAML file (merged into the user's own
``--config``, if any), which lm-eval's task manager accepts; ``lm-eval ls`` and ``lm-eval validate``
take no config file, so there the user's folder replaces ours (with a note on stderr).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import ttt_mixer  # noqa: F401  (registers the TTT classes with transformers' Auto classes)
from ttt_mixer.eval_tasks import tasks_path

LM_EVAL_SUBCOMMANDS = ("run", "ls", "validate")
INCLUDE_PATH = "--include_path"
CONFIG_FLAGS = ("--config", "-C")


def _pop_option(args: list[str], names: Sequence[str]) -> list[str]:
    """Remove every occurrence of a single-valued option (``--name VALUE`` or ``--name=VALUE``) from
    ``args`` and return its values, in order."""
    values: list[str] = []
    kept: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, equals, value = arg.partition("=")
        if arg == "--":  # everything after it is positional
            kept += args[i:]
            break
        if name in names and equals:
            values.append(value)
        elif arg in names:
            if i + 1 == len(args):
                raise SystemExit(f"ttt-mixer eval: {arg} needs a value")
            values.append(args[i + 1])
            i += 1
        else:
            kept.append(arg)
        i += 1
    args[:] = kept
    return values


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def lm_eval_argv(args: Sequence[str], config_dir: Path) -> list[str]:
    """lm-eval's arguments for ``ttt-mixer eval ARGS``: ``ARGS`` with ttt_mixer's task folder included.

    ``config_dir`` is where a merged ``--config`` file is written when the user names folders of
    their own (see the module docstring); it must outlive lm-eval's run."""
    args = list(args)
    if not args or args[0] in ("-h", "--help"):
        return args  # lm-eval's own help
    subcommand = args[0] if args[0] in LM_EVAL_SUBCOMMANDS else "run"
    ours = tasks_path()
    user_paths = _pop_option(args, (INCLUDE_PATH,))
    if subcommand != "run":
        if user_paths:
            print(
                f"ttt-mixer eval: lm-eval {subcommand} takes one {INCLUDE_PATH}; using "
                f"{user_paths[-1]} instead of ttt-mixer's tasks ({ours})",
                file=sys.stderr,
            )
        return [*args, INCLUDE_PATH, user_paths[-1] if user_paths else ours]
    user_configs = _pop_option(args, CONFIG_FLAGS)
    if not user_paths and not user_configs:
        return [*args, INCLUDE_PATH, ours]
    config: dict[str, Any] = {}
    if user_configs:  # its include_path would lose to ours on the command line: merge them
        loaded = yaml.safe_load(Path(user_configs[-1]).read_text())
        if not isinstance(loaded, dict):
            raise SystemExit(f"ttt-mixer eval: {user_configs[-1]} is not a YAML mapping")
        config = loaded
    # lm-eval lets a later folder override an earlier one's tasks: the user's come last
    paths = [ours, *_as_list(config.get("include_path")), *user_paths]
    config["include_path"] = list(dict.fromkeys(paths))
    merged = config_dir / "ttt_mixer_eval_config.yaml"
    merged.write_text(yaml.safe_dump(config, sort_keys=False))
    return [*args, "--config", str(merged)]


def main(args: Sequence[str]) -> None:
    """Run lm-eval's command line on ``args`` (what follows ``ttt-mixer eval``), ttt_mixer imported
    and ``ttt_mixer.eval_tasks`` included."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    with tempfile.TemporaryDirectory(prefix="ttt-mixer-eval-") as config_dir:
        sys.argv = ["lm-eval", *lm_eval_argv(args, Path(config_dir))]
        try:
            cli_evaluate()
        finally:
            sys.argv = saved
