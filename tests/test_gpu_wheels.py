"""CPU checks of the GPU check's set-up (benchmarks/gpu_env.py, gpu_wheels.sh, gpu_check.sh), so that a
wheel missing on the lent GPU machine shows here and not there: the carried wheels (the manifest
benchmarks/gpu_wheels.json) resolve against the image's packages (benchmarks/gpu_image_packages.txt)
for its Python 3.12 on Linux x86_64, everything the GPU check's code imports is in the image or
carried, the preflight imports what the wheels provide and reports a missing piece in one line, and
the project's package is laid out from the working tree. No network: the manifest records each
wheel's metadata, and gpu_wheels.sh checks the downloaded files against it."""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_env.py"
# the files the GPU check runs, besides the ttt_mixer modules they import
GPU_CHECK_FILES = [
    ROOT / "benchmarks" / "bench_kernels.py",
    ROOT / "tests" / "conftest.py",
    ROOT / "tests" / "ops_cases.py",
    ROOT / "tests" / "ops" / "test_triton.py",
]
LOCAL_MODULES = {"ttt_mixer", "ops_cases"}


@pytest.fixture(scope="module")
def gpu_env():
    spec = importlib.util.spec_from_file_location("gpu_env", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def manifest(gpu_env):
    return gpu_env.load_manifest()


@pytest.fixture(scope="module")
def image(gpu_env):
    return gpu_env.load_image()


def test_image_list_holds_the_packages_the_check_runs_on(image) -> None:
    python, packages = image
    assert python == "3.12.3"
    assert packages["torch"] == "2.11.0" and packages["triton"] == "3.6.0"
    assert packages["transformers"] == "5.17.0" and "einops" in packages
    assert "flash-linear-attention" not in packages and "fla-core" not in packages
    assert len(packages) == 197  # the names of /work/.library/device/KINDS.md's list, each once


def test_carried_wheels_resolve_against_the_image(gpu_env, manifest, image) -> None:
    assert [(w.name, w.version) for w in manifest.wheels] == [
        ("fla-core", "0.6.0"),
        ("flash-linear-attention", "0.6.0"),
    ]
    assert manifest.python_version == ".".join(image[0].split(".")[:2])
    assert gpu_env.unresolved(manifest, *image) == []
    # fla-core's CUDA extra is what the GPU check runs: its floors count too
    environment = gpu_env.image_marker_environment(image[0])
    needs = {str(r) for r in manifest.requirements(manifest.wheels[0], environment)}
    assert needs == {"einops", 'torch>=2.7.0; extra == "cuda"', 'triton>=3.3; extra == "cuda"'}


def test_unresolved_names_each_problem(gpu_env, manifest, image) -> None:
    python, packages = image
    fla_core, fla = manifest.wheels
    # a carried wheel's requirement neither carried nor in the image
    without_core = replace(manifest, wheels=(fla,))
    assert gpu_env.unresolved(without_core, python, packages) == [
        "flash-linear-attention needs fla-core==0.6.0: neither in the image nor carried"
    ]
    # the image's version outside the range
    assert gpu_env.unresolved(manifest, python, {**packages, "transformers": "5.5.0"}) == [
        "flash-linear-attention needs transformers<6,>=5.6.2: 5.5.0 in the image"
    ]
    # an extra's floor (fla-core[cuda]: triton >= 3.3)
    assert gpu_env.unresolved(manifest, python, {**packages, "triton": "3.2.0"}) == [
        'fla-core needs triton>=3.3; extra == "cuda": 3.2.0 in the image'
    ]
    # a range on a package whose version in the image nobody has read
    unread = gpu_env.unresolved(manifest, python, {**packages, "transformers": None})
    assert len(unread) == 1 and "transformers<6,>=5.6.2: in the image at an unread version" in unread[0]
    # a wheel for another Python, a Python the wheel refuses, and a second torch
    cp311 = replace(fla_core, filename="fla_core-0.6.0-cp311-cp311-manylinux_2_28_x86_64.whl")
    old_python = replace(fla, requires_python=">=3.13")
    torch = replace(
        fla_core,
        name="torch",
        version="2.13.0",
        filename="torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl",
        requires_dist=(),
    )
    problems = gpu_env.unresolved(replace(manifest, wheels=(cp311, old_python, torch)), python, packages)
    assert problems == [
        f"fla_core-0.6.0-cp311-cp311-manylinux_2_28_x86_64.whl does not install on CPython {python} "
        "manylinux_2_28_x86_64",
        f"flash-linear-attention needs Python >=3.13, the image has {python}",
        "torch is carried: the GPU check runs the image's own torch",
    ]


def _provider(module: str, manifest) -> str | None:
    """The carried wheel whose packages hold ``module`` (the longest package prefix), or None."""
    best = None
    for wheel in manifest.wheels:
        for package in wheel.packages:
            if (module == package or module.startswith(package + ".")) and (
                best is None or len(package) > len(best[1])
            ):
                best = (wheel.name, package)
    return None if best is None else best[0]


def test_preflight_imports_match_the_manifest(gpu_env, manifest, image) -> None:
    """The preflight imports something of every carried wheel (so a wheel that fails to load stops
    the run there), and each of its imports comes from a carried wheel, the image or the project."""
    imports = gpu_env.PREFLIGHT_IMPORTS
    provided = {_provider(module, manifest) for module in imports}
    assert {w.name for w in manifest.wheels} <= provided
    distributions = importlib.metadata.packages_distributions()
    for module in imports:
        top = module.split(".")[0]
        if _provider(module, manifest) is None and top not in LOCAL_MODULES:
            assert {canonicalize_name(d) for d in distributions[top]} <= set(image[1]), module


def _module_file(name: str, package_dir: dict[str, str]) -> Path | None:
    """The file of a ttt_mixer module in the working tree (package-dir applied), or None."""
    for package in sorted(package_dir, key=len, reverse=True):
        if name == package or name.startswith(package + "."):
            base = ROOT / package_dir[package] / Path(*name[len(package) + 1 :].split("."))
            break
    else:
        return None
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, package: str) -> set[str]:
    """Every module an import statement of ``path`` names (any depth, relative ones resolved), with
    the names it imports from them as possible submodules."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_gpu_check_code_imports_only_what_the_image_or_the_wheels_hold(manifest, image) -> None:
    """The imports of every file the GPU check runs, following ttt_mixer's own imports from
    ``import ttt_mixer`` and the check's files: each third-party one is in the image or carried (a
    new dependency of the kernels' path shows here, not on the GPU)."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    queue = [(path, "") for path in GPU_CHECK_FILES] + [(ROOT / "ttt_mixer" / "__init__.py", "ttt_mixer")]
    seen, third_party = set(), set()
    while queue:
        path, package = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path, package):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__" or top in LOCAL_MODULES - {"ttt_mixer"}:
                continue
            if top != "ttt_mixer":
                third_party.add(top)
                continue
            # a module and the packages above it run on import
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                module = ".".join(parts[:depth])
                if (file := _module_file(module, package_dir)) is not None:
                    queue.append((file, module if file.name == "__init__.py" else module.rpartition(".")[0]))
    assert any("triton_forward" in p.name for p in seen)  # the closure reaches the kernels
    assert not any("recall_gap" in str(p) for p in seen)  # and not what the check does not run
    distributions = importlib.metadata.packages_distributions()
    carried = {canonicalize_name(w.name) for w in manifest.wheels}
    missing = {
        top: sorted(canonicalize_name(d) for d in distributions.get(top, [top]))
        for top in sorted(third_party)
        if not {canonicalize_name(d) for d in distributions.get(top, [top])} <= set(image[1]) | carried
    }
    assert missing == {}
    assert {"torch", "triton", "fla", "transformers", "pytest"} <= third_party


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    metadata = "\n".join(
        ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", "Requires-Python: >=3.10"]
        + [f"Requires-Dist: {r}" for r in requires]
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
        archive.writestr(f"{name}/sub/__init__.py", "")
        archive.writestr(f"{name}/sub/deep/__init__.py", "")
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata + "\n")
    return path


def test_verify_folder_wants_exactly_the_manifest_wheels(gpu_env, manifest, tmp_path: Path) -> None:
    wheel = gpu_env.read_wheel(_fake_wheel(tmp_path, "demo", "1.0", ["einops", "torch>=2; extra == 'x'"]))
    assert (wheel.name, wheel.version, wheel.requires_python) == ("demo", "1.0", ">=3.10")
    assert wheel.requires_dist == ("einops", "torch>=2; extra == 'x'")
    assert wheel.packages == ("demo", "demo.sub")  # two levels
    demo = replace(manifest, wheels=(wheel,))
    assert gpu_env.verify_folder(tmp_path, demo) == []
    _fake_wheel(tmp_path, "other", "2.0", [])
    assert gpu_env.verify_folder(tmp_path, demo) == [
        f"other-2.0-py3-none-any.whl is in {tmp_path} but not in the manifest"
    ]
    (tmp_path / "other-2.0-py3-none-any.whl").unlink()
    _fake_wheel(tmp_path, "demo", "1.0", ["einops>=0.8"])  # the same file name, other contents
    assert gpu_env.verify_folder(tmp_path, demo) == [
        "demo-1.0-py3-none-any.whl differs from the manifest in sha256, size, requires_dist"
    ]
    assert gpu_env.verify_folder(tmp_path, manifest) == [
        f"{w.filename} is missing from {tmp_path}" for w in manifest.wheels
    ] + [f"demo-1.0-py3-none-any.whl is in {tmp_path} but not in the manifest"]


def test_write_manifest_records_the_pinned_wheels(gpu_env, tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    _fake_wheel(folder, "demo", "1.0", ["einops"])
    path = tmp_path / "manifest.json"
    pins = {
        "python_version": "3.12",
        "platforms": ["manylinux_2_28_x86_64"],
        "wheels": [{"name": "demo", "version": "1.0"}],
    }
    path.write_text(json.dumps(pins))
    gpu_env.write_manifest(folder, path)
    written = gpu_env.load_manifest(path)
    assert written.wheels == (gpu_env.read_wheel(folder / "demo-1.0-py3-none-any.whl"),)
    path.write_text(json.dumps({**pins, "wheels": [{"name": "demo", "version": "2.0"}]}))
    with pytest.raises(gpu_env.SetupError, match="the manifest pins"):
        gpu_env.write_manifest(folder, path)


def test_download_args_pin_the_manifest(gpu_env, manifest, capsys: pytest.CaptureFixture) -> None:
    assert gpu_env.main(["download-args"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["--python-version", "3.12", "--implementation", "cp"]
    assert lines[4:6] == ["--platform", "manylinux_2_28_x86_64"]
    assert lines[-2:] == ["fla-core==0.6.0", "flash-linear-attention==0.6.0"]


def test_link_package_lays_out_the_working_tree(gpu_env, tmp_path: Path) -> None:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert gpu_env.link_package(tmp_path) == [tmp_path / "ttt_mixer"]
    assert (tmp_path / "ttt_mixer" / "adapters").resolve() == ROOT / "adapters"
    assert (tmp_path / "ttt_mixer" / "eval_tasks").resolve() == ROOT / "eval_tasks"
    assert (tmp_path / "ttt_mixer" / "ops").resolve() == ROOT / "ttt_mixer" / "ops"
    assert not (tmp_path / "ttt_mixer" / "__pycache__").exists()
    # every package pyproject installs is found there, in the working tree, by Python's own finder
    for package in setuptools["packages"]:
        path = [str(tmp_path)]
        for part in package.split("."):
            spec = importlib.machinery.PathFinder.find_spec(part, path)
            assert spec is not None, package
            path = spec.submodule_search_locations
        expected = ROOT / setuptools["package-dir"].get(package, package.replace(".", "/"))
        if package not in setuptools["package-dir"]:
            parent = max((p for p in setuptools["package-dir"] if package.startswith(p + ".")), key=len)
            expected = ROOT / setuptools["package-dir"][parent] / Path(*package[len(parent) + 1 :].split("."))
        assert Path(spec.origin).resolve() == expected / "__init__.py", package
    with pytest.raises(gpu_env.SetupError, match="exists"):
        gpu_env.link_package(tmp_path)


def test_preflight_reports_versions_or_the_first_missing_piece(
    gpu_env, manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On this CPU machine the dev environment holds the carried versions (the lock's fla), so the
    preflight passes without a GPU; each kind of failure is one line naming what is missing."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it on CPU
    line = gpu_env.preflight(manifest, site=None, require_cuda=False)
    assert line.startswith("preflight ok: Python ") and "fla-core 0.6.0" in line and "\n" not in line

    other = replace(manifest.wheels[0], version="0.5.2")
    with pytest.raises(
        gpu_env.SetupError, match=r"^fla-core is 0\.6\.0, the manifest carries 0\.5\.2: run bash"
    ):
        gpu_env.preflight(replace(manifest, wheels=(other,)), site=None, require_cuda=False)
    with pytest.raises(gpu_env.SetupError, match="not from the carried"):
        gpu_env.preflight(manifest, site=tmp_path, require_cuda=False)
    monkeypatch.setitem(gpu_env.MINIMUMS, "triton", ("99.0", "a feature of Triton 99"))
    with pytest.raises(
        gpu_env.SetupError, match=r"^triton \S+ is older than 99\.0, which the GPU check needs: a feature"
    ):
        gpu_env.preflight(manifest, site=None, require_cuda=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(gpu_env.SetupError, match="TRITON_INTERPRET=1"):
        gpu_env.preflight(manifest, site=None, require_cuda=False)


def test_wheel_folder_is_ignored_and_scripts_use_the_manifest() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".whl/fla_core-0.6.0-py3-none-any.whl"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0
    check = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "gpu_env.py link-package" in check and "gpu_env.py preflight" in check
    assert "--no-index --no-deps" in check and "-P -m pytest" in check
    wheels = (ROOT / "benchmarks" / "gpu_wheels.sh").read_text()
    assert "gpu_env.py download-args" in wheels and "gpu_env.py verify .whl" in wheels
