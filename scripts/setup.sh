#!/usr/bin/env bash
# Creates .venv and installs ttt-mixer with its test tools. On a machine without an NVIDIA GPU it
# installs the CPU build of torch (torch==2.13.0+cpu) first, so that nothing pulls CUDA wheels; set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where pip has no CPU build at hand.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" "torch==2.13.0"
else
    "${pip[@]}" "torch==2.13.0+cpu"
fi
"${pip[@]}" -e ".[test]"
