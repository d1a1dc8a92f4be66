"""eval_tasks' modules import each other one way: the task families (one module each) import the
shared helpers, never each other, and the helpers import no family, so the imports hold no circle;
every ``!function`` of the task YAMLs names a function or class that exists."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import yaml

from ttt_mixer.eval_tasks import tasks_path

FAMILIES = {"recall", "recall_data", "perplexity", "set_disjointness"}
HELPERS = {"options", "tokens", "documents", "per_length"}
PACKAGE = "ttt_mixer.eval_tasks"


def package_imports(path: Path) -> set[str]:
    """The modules of this package that ``path`` imports (relative or absolute, at any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                names |= {module} if module else {alias.name for alias in node.names}
            elif module == PACKAGE:
                names |= {alias.name for alias in node.names}
            elif module.startswith(PACKAGE + "."):
                names.add(module.removeprefix(PACKAGE + ".").split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {
                alias.name.removeprefix(PACKAGE + ".").split(".")[0]
                for alias in node.names
                if alias.name.startswith(PACKAGE + ".")
            }
    return names


def test_the_modules_are_the_families_and_the_helpers() -> None:
    modules = {path.stem for path in Path(tasks_path()).glob("*.py")} - {"__init__"}
    assert modules == FAMILIES | HELPERS


def test_families_import_helpers_only_and_helpers_no_family() -> None:
    for name in FAMILIES | HELPERS:
        imported = package_imports(Path(tasks_path(), f"{name}.py"))
        allowed = HELPERS - {name} if name in FAMILIES else HELPERS - {name, "per_length"}
        assert imported <= allowed, (name, sorted(imported - allowed))
    # and so no circle: a helper imports only helpers below it
    order = ["options", "tokens", "documents", "per_length"]
    for position, name in enumerate(order):
        assert package_imports(Path(tasks_path(), f"{name}.py")) <= set(order[:position]), name


def test_every_yaml_function_exists() -> None:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    references = []
    for path in Path(tasks_path()).glob("*.yaml"):
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        references += [value[1] for value in config.values() if isinstance(value, tuple)]
    assert references
    for reference in references:
        module, _, name = reference.rpartition(".")
        assert module.startswith(PACKAGE + "."), reference
        assert callable(getattr(importlib.import_module(module), name)), reference
