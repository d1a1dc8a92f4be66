#!/usr/bin/env bash
# Sets up a fresh machine and tests (what CI runs):
#   bash scripts/test.sh [PYTEST_ARGS]   the linters and the whole test suite in .venv (the committed lock,
#                                        requirements/lock-cpu.txt), then the compatibility subset
#                                        (pytest -m compat) in .venv-floor, at pyproject.toml's floors
#                                        (requirements/floor-cpu.txt); PYTEST_ARGS go to the first run
#   bash scripts/test.sh --newest [...]  only the compatibility subset, in .venv-newest, at the newest
#                                        releases (no lock)
# TTT_MIXER_LOCK names the lock an environment was made from, for tests/test_versions.py.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == --newest ]]; then
    shift
    bash scripts/setup.sh .venv-newest --newest
    .venv-newest/bin/python -m pytest -q -n auto -m compat "$@"
    exit
fi

bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# one pytest-xdist worker per core (the tests keep one torch thread each, tests/conftest.py); the
# slowest tests are listed at the end, to keep CI's time in view
TTT_MIXER_LOCK=requirements/lock-cpu.txt .venv/bin/python -m pytest -q -n auto --durations=15 "$@"

bash scripts/setup.sh .venv-floor requirements/floor-cpu.txt
TTT_MIXER_LOCK=requirements/floor-cpu.txt .venv-floor/bin/python -m pytest -q -n auto -m compat
