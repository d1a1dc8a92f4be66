"""The environment of the GPU check (benchmarks/gpu_check.sh) on a lent GPU machine, whose image is fixed
(benchmarks/gpu_image_packages.txt) and which reaches no package registry: the wheels carried with the
call (benchmarks/gpu_wheels.json, downloaded by benchmarks/gpu_wheels.sh into .whl/), the check that
they resolve against the image, the project's package laid out from the working tree, and the
preflight that fails in the first seconds with one line when something is still missing.

    python benchmarks/gpu_env.py download-args         # pip download's platform options and pins
    python benchmarks/gpu_env.py verify .whl           # the folder holds exactly the manifest's wheels
    python benchmarks/gpu_env.py write-manifest .whl   # after changing a pin: record the new wheels
    python benchmarks/gpu_env.py link-package DEST     # DEST/ttt_mixer from the working tree
    python benchmarks/gpu_env.py preflight [--site DIR] [--no-cuda]

Only the standard library and ``packaging`` (both in the image) are imported at module level.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import warnings
import zipfile
from dataclasses import asdict, dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "benchmarks" / "gpu_wheels.json"
IMAGE_PACKAGES = ROOT / "benchmarks" / "gpu_image_packages.txt"

# What the GPU check imports (the Triton tests, tests/ops/test_triton.py with tests/conftest.py, and
# benchmarks/bench_kernels.py): the preflight imports each, so that a missing package fails there in
# seconds rather than minutes into the run. tests/test_gpu_wheels.py checks that every carried wheel
# provides one of them and that each comes from the image or a carried wheel.
PREFLIGHT_IMPORTS = (
    "torch",
    "triton",
    "transformers",
    "fla",
    "fla.layers",
    "fla.models",
    "fla.ops.ttt",
    "fla.ops.gla",
    "fla.ops.gated_delta_rule",
    "pytest",
    "ttt_mixer",
    "ttt_mixer.ops",
)

# The oldest release of the image's packages that the GPU check's own code can run on, with the feature
# that needs it, as far as reading the code and the release notes tells (benchmarks/README.md, "What the
# GPU check needs"); the carried wheels' own floors (fla-core[cuda]: torch >= 2.7, triton >= 3.3) are
# checked from their metadata.
MINIMUMS = {
    "triton": (
        "3.3",
        "the kernels pass NamedTuples of tensors into @triton.jit functions and return them from "
        "@triton.jit helpers (triton-lang/triton#5518 and #6042, merged after 3.2 was branched)",
    ),
}


class SetupError(Exception):
    """Something the GPU check needs is missing or does not fit; the message is one line."""


# The carried wheels ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """One carried wheel, as the manifest records it (from its file: benchmarks/gpu_env.py write-manifest)."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int
    requires_python: str
    requires_dist: tuple[str, ...]
    packages: tuple[str, ...]  # its packages down to two levels (fla, fla.ops, ...)


@dataclass(frozen=True)
class Manifest:
    python_version: str  # the image's X.Y, for pip download and the wheels' tags
    platforms: tuple[str, ...]  # pip download --platform values, in order
    wheels: tuple[Wheel, ...]
    # the extras of a carried package that the GPU check uses (fla-core's CUDA path): their
    # requirements must be met too, though pip installs none of them (--no-deps)
    extras: dict[str, tuple[str, ...]]

    def requirements(self, wheel: Wheel, environment: dict[str, str]) -> list[Requirement]:
        """What ``wheel`` needs in ``environment``, with the extras the GPU check uses."""
        extras = ("", *self.extras.get(canonicalize_name(wheel.name), ()))
        requirements = [Requirement(line) for line in wheel.requires_dist]
        return [
            r
            for r in requirements
            if r.marker is None or any(r.marker.evaluate({**environment, "extra": e}) for e in extras)
        ]


def load_manifest(path: Path = MANIFEST) -> Manifest:
    data = json.loads(path.read_text())
    wheels = tuple(
        Wheel(**{**w, "requires_dist": tuple(w["requires_dist"]), "packages": tuple(w["packages"])})
        for w in data["wheels"]
    )
    extras = {canonicalize_name(name): tuple(e) for name, e in data.get("extras", {}).items()}
    return Manifest(data["python_version"], tuple(data["platforms"]), wheels, extras)


def read_wheel(path: Path) -> Wheel:
    """A wheel file's name, version, Requires-Python, Requires-Dist and packages, from its METADATA."""
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as archive:
        dist_info = f"{path.name.split('-')[0]}-{path.name.split('-')[1]}.dist-info"
        metadata = HeaderParser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        files = archive.namelist()
    if canonicalize_name(metadata["Name"]) != name or Version(metadata["Version"]) != version:
        raise SetupError(f"{path.name}: its METADATA names {metadata['Name']} {metadata['Version']}")
    packages = sorted(
        {
            f.rsplit("/", 1)[0].replace("/", ".")
            for f in files
            if f.endswith("/__init__.py") and f.count("/") <= 2
        }
    )
    return Wheel(
        name=str(name),
        version=str(version),
        filename=path.name,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        size=path.stat().st_size,
        requires_python=metadata.get("Requires-Python", ""),
        requires_dist=tuple(metadata.get_all("Requires-Dist") or ()),
        packages=tuple(packages),
    )


def verify_folder(folder: Path, manifest: Manifest) -> list[str]:
    """Problems with a downloaded wheel folder: it must hold exactly the manifest's wheels, byte for byte
    (two versions of one package would stop the install there)."""
    problems = []
    present = {p.name: p for p in folder.glob("*.whl")}
    for wheel in manifest.wheels:
        path = present.pop(wheel.filename, None)
        if path is None:
            problems.append(f"{wheel.filename} is missing from {folder}")
        elif (found := read_wheel(path)) != wheel:
            differs = [k for k, v in asdict(found).items() if v != asdict(wheel)[k]]
            problems.append(f"{wheel.filename} differs from the manifest in {', '.join(differs)}")
    problems += [f"{name} is in {folder} but not in the manifest" for name in sorted(present)]
    return problems


# The image and what resolves against it ------------------------------------------------------------------


def load_image(path: Path = IMAGE_PACKAGES) -> tuple[str, dict[str, str | None]]:
    """The image's Python version and its packages: canonical name -> version (None where unread)."""
    packages: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = version or None
    python = packages.pop("python", None)
    if python is None:
        raise SetupError(f"{path}: no python==X.Y.Z line")
    return python, packages


def image_marker_environment(python_version: str) -> dict[str, str]:
    """Marker values of the image's interpreter: CPython python_version on Linux x86_64."""
    major_minor = ".".join(python_version.split(".")[:2])
    return {
        "implementation_name": "cpython",
        "implementation_version": python_version,
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": python_version,
        "python_version": major_minor,
        "sys_platform": "linux",
    }


def supported_tags(python_version: str, platforms: tuple[str, ...]) -> set[Tag]:
    version = tuple(int(part) for part in python_version.split(".")[:2])
    return {
        *cpython_tags(version, platforms=platforms),
        *compatible_tags(version, interpreter=f"cp{version[0]}{version[1]}", platforms=platforms),
    }


def unresolved(manifest: Manifest, python_version: str, image: dict[str, str | None]) -> list[str]:
    """Why the carried wheels would not install and import on the image (empty when they would): each
    wheel fits the image's Python and platform, adds no second copy of the image's torch or triton,
    and each requirement that applies is met by a carried wheel or by the image at a version known to
    fit."""
    problems = []
    carried = {canonicalize_name(w.name): w.version for w in manifest.wheels}
    environment = image_marker_environment(python_version)
    tags = supported_tags(python_version, manifest.platforms)
    for wheel in manifest.wheels:
        if not set(parse_wheel_filename(wheel.filename)[3]) & tags:
            problems.append(
                f"{wheel.filename} does not install on CPython {python_version} {manifest.platforms[0]}"
            )
        if wheel.requires_python and python_version not in SpecifierSet(wheel.requires_python):
            problems.append(
                f"{wheel.name} needs Python {wheel.requires_python}, the image has {python_version}"
            )
        for requirement in manifest.requirements(wheel, environment):
            name = canonicalize_name(requirement.name)
            version = carried.get(name) or image.get(name)
            where = "carried" if name in carried else "in the image"
            if name not in carried and name not in image:
                problems.append(f"{wheel.name} needs {requirement}: neither in the image nor carried")
            elif version is None:
                if requirement.specifier:
                    problems.append(
                        f"{wheel.name} needs {requirement}: in the image at an unread version (add it to "
                        f"{IMAGE_PACKAGES.name} from `pip show` there, or carry the wheel)"
                    )
            elif not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{wheel.name} needs {requirement}: {version} {where}")
    for name in ("torch", "triton"):
        if name in carried:
            problems.append(f"{name} is carried: the GPU check runs the image's own {name}")
    return problems


# The project's package, laid out from the working tree ---------------------------------------------------


def link_package(dest: Path, pyproject: Path = ROOT / "pyproject.toml") -> list[Path]:
    """Lay out the project's packages under ``dest`` as setuptools' package-dir maps them, with symbolic
    links to the working tree (``ttt_mixer/*``, ``ttt_mixer/adapters -> adapters``, ...), so that
    ``dest`` on PYTHONPATH imports the working tree as installed, without installing it. Returns the
    top-level packages made."""
    import tomllib  # Python 3.11+: the image has 3.12

    package_dir = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    roots = sorted(name for name in package_dir if "." not in name)
    made = []
    for root in roots:
        source = pyproject.parent / package_dir[root]
        target = dest / root
        if target.exists() or target.is_symlink():
            raise SetupError(f"{target} exists: link the package into an empty folder")
        target.mkdir(parents=True)
        for entry in sorted(source.iterdir()):
            if entry.name != "__pycache__":
                (target / entry.name).symlink_to(entry)
        made.append(target)
    for name in sorted(package_dir, key=lambda n: n.count(".")):
        if "." not in name:
            continue
        parent, _, child = name.rpartition(".")
        if parent not in roots:
            raise SetupError(f"package-dir maps {name}, whose parent {parent} is not a top-level package")
        link = dest / parent.replace(".", "/") / child
        if link.exists() or link.is_symlink():
            raise SetupError(f"package-dir maps {name} onto {link}, which the tree already holds")
        link.symlink_to(pyproject.parent / package_dir[name])
    return made


# The preflight on the GPU machine --------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def preflight(manifest: Manifest, site: Path | None, require_cuda: bool) -> str:
    """Check what the GPU check needs, in a few seconds, and return one line of versions; SetupError
    with one line naming the first thing missing. ``site``: where the carried wheels were installed
    (each must be found there, at its manifest version)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SetupError("TRITON_INTERPRET=1 is set: the GPU check runs the kernels natively")
    hint = "run bash benchmarks/gpu_wheels.sh here and carry .whl (benchmarks/README.md)"
    for wheel in manifest.wheels:
        found = _version(wheel.name)
        if found is None:
            raise SetupError(f"{wheel.name} {wheel.version} is not installed: {hint}")
        if Version(found) != Version(wheel.version):
            raise SetupError(f"{wheel.name} is {found}, the manifest carries {wheel.version}: {hint}")
        location = Path(str(importlib.metadata.distribution(wheel.name).locate_file(""))).resolve()
        if site is not None and location != site.resolve():
            raise SetupError(f"{wheel.name} is imported from {location}, not from the carried {site}")
        for requirement in manifest.requirements(wheel, dict(default_environment())):
            have = _version(requirement.name)
            if have is None or not requirement.specifier.contains(have, prereleases=True):
                raise SetupError(f"{wheel.name} needs {requirement}, this machine has {have or 'none'}")
    for name, (minimum, feature) in MINIMUMS.items():
        have = _version(name)
        if have is None or Version(have).release < Version(minimum).release:
            raise SetupError(f"{name} {have} is older than {minimum}, which the GPU check needs: {feature}")
    for module in PREFLIGHT_IMPORTS:
        try:
            with warnings.catch_warnings():  # the preflight says one line; the run shows any warning
                warnings.simplefilter("ignore")
                importlib.import_module(module)
        except Exception as error:  # any import failure is what the preflight reports
            raise SetupError(f"import {module} failed: {_first_line(error)}") from error
    # the project runs from the working tree, laid out as installed (link_package)
    for package, folder in (("ttt_mixer", "ttt_mixer"), ("ttt_mixer.adapters", "adapters")):
        spec = importlib.util.find_spec(package)
        origin = None if spec is None or spec.origin is None else Path(spec.origin).resolve()
        if origin != (ROOT / folder / "__init__.py").resolve():
            raise SetupError(f"{package} resolves to {origin}, not to this working tree's {folder}/")
    import torch

    if require_cuda and not torch.cuda.is_available():
        raise SetupError(f"torch {torch.__version__} sees no CUDA GPU")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    versions = ", ".join(
        f"{name} {_version(name)}"
        for name in ("triton", "transformers", *(w.name for w in manifest.wheels), "pytest")
    )
    return (
        f"preflight ok: Python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}, {device}), {versions}"
    )


# Command line ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("download-args", help="pip download's options and name==version pins, one a line")
    for name in ("verify", "write-manifest"):
        commands.add_parser(name).add_argument("folder", type=Path)
    commands.add_parser("link-package").add_argument("dest", type=Path)
    check = commands.add_parser("preflight")
    check.add_argument("--site", type=Path, help="where the carried wheels were installed")
    check.add_argument("--no-cuda", action="store_true", help="do not ask for a GPU (a CPU rehearsal)")
    args = parser.parse_args(argv)
    try:
        if args.command == "download-args":
            # read raw: pins whose other fields write-manifest has yet to record are enough here
            data = json.loads(MANIFEST.read_text())
            print("\n".join(["--python-version", data["python_version"], "--implementation", "cp"]))
            for value in data["platforms"]:
                print(f"--platform\n{value}")
            print("\n".join(f"{w['name']}=={w['version']}" for w in data["wheels"]))
        elif args.command == "verify":
            manifest = load_manifest()
            python, image = load_image()
            problems = verify_folder(args.folder, manifest) + unresolved(manifest, python, image)
            if problems:
                raise SetupError("; ".join(problems))
            names = ", ".join(f"{w.name} {w.version}" for w in manifest.wheels)
            print(f"{args.folder}: {names}; every requirement met by the image (Python {python}) or them")
        elif args.command == "write-manifest":
            write_manifest(args.folder)
        elif args.command == "link-package":
            for made in link_package(args.dest):
                print(made)
        else:
            print(preflight(load_manifest(), args.site, require_cuda=not args.no_cuda))
    except SetupError as error:
        print(f"{args.command} FAILED: {error}", file=sys.stderr)
        return 2
    return 0


def write_manifest(folder: Path, path: Path = MANIFEST) -> None:
    """Record the wheels of ``folder`` (one per package pinned in the manifest) in the manifest."""
    data = json.loads(path.read_text())
    pins = {canonicalize_name(w["name"]): w["version"] for w in data["wheels"]}
    wheels = [read_wheel(p) for p in sorted(folder.glob("*.whl"))]
    if {canonicalize_name(w.name): w.version for w in wheels} != pins:
        raise SetupError(f"{folder} holds {[w.filename for w in wheels]}, the manifest pins {pins}")
    data["wheels"] = [asdict(w) for w in wheels]
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
