#!/usr/bin/env bash
# Regenerates the committed locks in requirements/ with uv (`uv pip compile`; uv goes into a throwaway
# virtual environment when it is not on PATH), for Python 3.11 on x86-64 Linux:
#   lock-cpu.txt   everything `pip install -e .[test]` needs, at the newest releases pyproject.toml allows
#                  (what scripts/setup.sh installs)
#   floor-cpu.txt  the same with every direct dependency at pyproject.toml's floor (--resolution
#                  lowest-direct; tests/test_versions.py checks that the two agree)
# torch is the CPU build of TORCH in both. lock-cpu.txt pins the triton that TORCH's CUDA build
# requires, so that on a GPU machine the CUDA build and the lock's other pins agree.
#   bash scripts/lock.sh          every pin at its newest allowed release
#   bash scripts/lock.sh --keep   every pin kept where pyproject.toml still allows it, only what it newly
#                                 asks for added (a new dependency without upgrading the others)
# Packages installed without their dependencies (requirements/no-deps.txt) are pinned by hand there.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0
upgrade=(--upgrade)
if [[ ${1:-} == --keep ]]; then
    upgrade=()
elif [[ $# -gt 0 ]]; then
    echo "usage: bash scripts/lock.sh [--keep]" >&2
    exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! command -v uv >/dev/null 2>&1; then
    python3 -m venv "$tmp/uv"
    "$tmp/uv/bin/python" -m pip install --quiet --disable-pip-version-check uv
    PATH="$tmp/uv/bin:$PATH"
fi
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
# uv reads no pip configuration: the CPU build of torch comes from PIP_FIND_LINKS (a folder of wheels,
# as on this project's machines), else from PyTorch's CPU index
if [[ -n ${PIP_FIND_LINKS:-} ]]; then
    cpu_torch=(--find-links "$PIP_FIND_LINKS")
else
    cpu_torch=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi

# the CUDA build's triton (from PyPI's metadata of torch==TORCH; no wheel is installed)
echo "torch==$TORCH" >"$tmp/torch-cuda.in"
grep '^triton==' <(uv pip compile --quiet --no-header --no-annotate "${target[@]}" "$tmp/torch-cuda.in") \
    >"$tmp/triton.txt"

echo "torch==$TORCH+cpu" >"$tmp/torch-cpu.txt"
compile=(uv pip compile --quiet "${upgrade[@]}" pyproject.toml --extra test "${target[@]}" "${cpu_torch[@]}"
    --custom-compile-command "bash scripts/lock.sh")
"${compile[@]}" -c "$tmp/torch-cpu.txt" -c "$tmp/triton.txt" -o requirements/lock-cpu.txt
"${compile[@]}" -c "$tmp/torch-cpu.txt" --resolution lowest-direct -o requirements/floor-cpu.txt
echo "wrote requirements/lock-cpu.txt and requirements/floor-cpu.txt ($(cat "$tmp/triton.txt"), torch==$TORCH+cpu)"
