#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh), then runs the main job. Until the recall-gap job lands,
# that is the demo: a small TTT model built in code, trained briefly, generating, and its decoding speed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ttt-mixer demo "$@"
