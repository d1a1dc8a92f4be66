#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh), then runs the main job: the recall-gap comparison of
# attention, Based, Mamba, TTT-Linear, TTT-MLP, GLA, Gated DeltaNet, Mamba-2 and Longhorn in one
# backbone (about 9.5 minutes on 2 CPU cores). Output folder: outputs/recall-gap (rerun to
# resume); extra arguments go to `ttt-mixer recall-gap` (e.g. --preset zoology-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ttt-mixer recall-gap --out outputs/recall-gap "$@"
