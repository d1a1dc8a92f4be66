#!/usr/bin/env bash
# Every GPU figure of issue 15 from one run (about 5 minutes on an H200), written under one folder:
#   1. the Triton kernel tests natively on the GPU: 16-bit inputs against a float32 run (relative RMS
#      error <= 5e-3, tests/ops/test_triton.py::test_half_precision_matches_float32_run) and the
#      fused TTT-Linear backward's gradients against the float64 primal form;
#   2. the benchmark table of benchmarks/bench_kernels.py (kernels.md, kernels.json).
# Usage, from the repository root:  bash benchmarks/gpu_check.sh [OUT_FOLDER]   (default gpu_check_out)
# On a lent GPU machine, whose image is fixed and reaches no registry (benchmarks/README.md): first
# `bash benchmarks/gpu_wheels.sh` on the CPU machine, then the device call carries .whl and runs this.
# Set-up, in the first seconds, touching neither the image's packages nor the working tree:
#   - the wheels in .whl/ (when there) are installed with pip --no-index --no-deps into a folder of their
#     own (GPU_SITE, default /tmp/gpu_site) that goes first on PYTHONPATH;
#   - the project runs from the working tree, never installed: benchmarks/gpu_env.py link-package lays
#     its packages out in a temporary folder as pyproject.toml's package-dir maps them (ttt_mixer/*,
#     ttt_mixer/adapters -> adapters/, ...), with symbolic links, and that folder goes on PYTHONPATH;
#   - the preflight (benchmarks/gpu_env.py preflight) imports what the check needs, checks the carried
#     wheels and the versions, and stops the run with one line naming what is missing.
# PYTHON picks the interpreter (default .venv/bin/python when it exists, else python3: the image's,
# /opt/torch/.venv/bin/python3). Extra arguments for the benchmark go in BENCH_ARGS, e.g.
# BENCH_ARGS="--lengths 1024 8192 --repeats 5".
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT=${1:-gpu_check_out}
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
mkdir -p "$OUT"
# the kernels must run natively: never in Triton's interpreter
unset TRITON_INTERPRET

echo "== set-up"
site_args=()
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=${GPU_SITE:-/tmp/gpu_site}
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$SITE" .whl/*.whl ||
        { echo "set-up FAILED: pip could not install .whl/*.whl into $SITE" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    site_args=(--site "$SITE")
fi
package=$(mktemp -d) || exit 2
trap 'rm -rf "$package"' EXIT
"$PYTHON" benchmarks/gpu_env.py link-package "$package" >/dev/null || exit 2
export PYTHONPATH="$package:$PYTHONPATH"
"$PYTHON" benchmarks/gpu_env.py preflight "${site_args[@]}" 2>&1 | tee "$OUT/preflight.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || exit 2

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || { echo "no GPU: nvidia-smi failed" >&2; exit 2; }

echo "== kernel tests on the GPU"
# -P: the working tree's root must not shadow the linked package (it lacks ttt_mixer.adapters)
timeout 180 "$PYTHON" -P -m pytest -q -p no:cacheprovider tests/ops/test_triton.py \
    -k "half_precision or (gradients_match_primal and linear) or gradients_float64" \
    --junitxml "$OUT/tests.xml" 2>&1 | tee "$OUT/tests.txt"
tests_status=${PIPESTATUS[0]}

echo "== benchmark table"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout 240 "$PYTHON" benchmarks/bench_kernels.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
bench_status=${PIPESTATUS[0]}

echo "== done: tests exit status $tests_status, benchmark exit status $bench_status (124: time limit)"
echo "   results in $OUT: preflight.txt, tests.txt, tests.xml, kernels.md, kernels.json, bench.txt, nvidia-smi.txt"
[[ $tests_status -eq 0 && $bench_status -eq 0 ]]
