"""The versions installed are the committed lock's, and the locks agree with pyproject.toml.

scripts/test.sh names the lock of the environment it tests in ``TTT_MIXER_LOCK``
(``requirements/lock-cpu.txt`` for ``.venv``, ``requirements/floor-cpu.txt`` for ``.venv-floor``); in
any other environment (a developer's own, ``scripts/test.sh --newest``) the variable is unset and the
installed-versions test skips. The floor lock must pin every direct dependency at exactly
pyproject.toml's floor, so that the compatibility subset run at the floor tests the floors pyproject
promises.
"""

import os
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.compat

ROOT = Path(__file__).resolve().parents[1]
LOCK_VARIABLE = "TTT_MIXER_LOCK"
LOCKS = ("requirements/lock-cpu.txt", "requirements/floor-cpu.txt")
FLOOR_LOCK = "requirements/floor-cpu.txt"


def locked_pins(lock: str) -> dict[NormalizedName, Version]:
    """The ``name==version`` pins of a lock written by ``uv pip compile``, by normalised name."""
    pins = {}
    for line in (ROOT / lock).read_text().splitlines():
        line = line.partition("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{lock}: {line!r} is not a pin"
        pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def direct_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and its test extra's."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]]


def test_installed_versions_are_the_locked_ones() -> None:
    lock = os.environ.get(LOCK_VARIABLE)
    if not lock:
        pytest.skip(
            f"{LOCK_VARIABLE} is unset: this environment was not set up from a lock by scripts/test.sh "
            "(a developer's own environment, or --newest)"
        )
    wrong = {}
    for name, pinned in locked_pins(lock).items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong[name] = (str(pinned), "not installed")
            continue
        # on a GPU machine the set-up installs the CUDA build of the locked torch (2.13.0 for 2.13.0+cpu)
        if installed != pinned and not (name == "torch" and installed.public == pinned.public):
            wrong[name] = (str(pinned), str(installed))
    assert not wrong, f"installed versions differ from {lock} (locked, installed): {wrong}"


def test_pyproject_floors_are_the_floor_locks_pins() -> None:
    pins = locked_pins(FLOOR_LOCK)
    wrong = {}
    for requirement in direct_requirements():
        floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert len(floors) == 1, f"pyproject.toml: {requirement} needs one floor (>=)"
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None or Version(pinned.public) != floors[0]:
            wrong[requirement.name] = (str(floors[0]), str(pinned))
    assert not wrong, f"pyproject.toml's floors differ from {FLOOR_LOCK}'s pins (floor, pinned): {wrong}"


@pytest.mark.parametrize("lock", LOCKS)
def test_locks_pin_every_direct_dependency_within_its_range(lock: str) -> None:
    pins = locked_pins(lock)
    for requirement in direct_requirements():
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{lock} lacks {requirement.name}: run bash scripts/lock.sh"
        assert requirement.specifier.contains(pinned), (
            f"{lock}: {requirement.name}=={pinned} outside {requirement}"
        )
