#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels that a lent GPU machine needs for
# benchmarks/gpu_check.sh and its image lacks: those pinned in benchmarks/gpu_wheels.json, for the
# image's CPython 3.12 on manylinux x86_64 (its packages: benchmarks/gpu_image_packages.txt). Run it on
# the CPU machine before the device call, which carries .whl (benchmarks/README.md). It then checks
# that the folder holds exactly the manifest's wheels (file hashes and metadata) and that every
# requirement they have is met by the image or by another carried wheel, and prints the sizes that
# travel: the working tree plus .whl must stay under the device tool's 64 MiB.
#   bash benchmarks/gpu_wheels.sh                    download and check
#   bash benchmarks/gpu_wheels.sh --write-manifest   after changing a pin in gpu_wheels.json: download,
#                                                    record the new wheels in the manifest, check
# PYTHON picks the interpreter that runs pip (default .venv/bin/python when it exists, else python3).
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ $# -gt 1 || ($# -eq 1 && $1 != --write-manifest) ]]; then
    echo "usage: bash benchmarks/gpu_wheels.sh [--write-manifest]" >&2
    exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
LIMIT_MIB=64  # what one device call carries: the working tree and the carried folders

mapfile -t download_args < <("$PYTHON" benchmarks/gpu_env.py download-args)
rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl "${download_args[@]}"
if [[ ${1:-} == --write-manifest ]]; then
    "$PYTHON" benchmarks/gpu_env.py write-manifest .whl
fi
"$PYTHON" benchmarks/gpu_env.py verify .whl

wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb | tail -1 | cut -f1)
total=$((wheels + tree + ${untracked:-0}))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "wheels in .whl: $(mib "$wheels") ($(cd .whl && echo *.whl))"
echo "working tree: $(mib "$tree") tracked, $(mib "${untracked:-0}") untracked; with .whl: $(mib "$total") of ${LIMIT_MIB} MiB"
if ((total > LIMIT_MIB * 1048576)); then
    echo "over the ${LIMIT_MIB} MiB a device call carries: carry fewer wheels" >&2
    exit 1
fi
