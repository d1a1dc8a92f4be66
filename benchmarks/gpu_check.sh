#!/usr/bin/env bash
# Every GPU figure of issue 15 from one run (about 5 minutes on an H200), written under one folder:
#   1. the Triton kernel tests natively on the GPU: 16-bit inputs against a float32 run (relative RMS
#      error <= 5e-3, tests/ops/test_triton.py::test_half_precision_matches_float32_run) and the
#      fused TTT-Linear backward's gradients against the float64 primal form;
#   2. the benchmark table of benchmarks/bench_kernels.py (kernels.md, kernels.json).
# Usage, from the repository root:  bash benchmarks/gpu_check.sh [OUT_FOLDER]   (default gpu_check_out)
# PYTHON picks the interpreter (default .venv/bin/python when it exists, else python). Extra arguments
# for the benchmark go in BENCH_ARGS, e.g. BENCH_ARGS="--lengths 1024 8192 --repeats 5".
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT=${1:-gpu_check_out}
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
mkdir -p "$OUT"
# the kernels must run natively: never in Triton's interpreter
unset TRITON_INTERPRET

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || { echo "no GPU: nvidia-smi failed" >&2; exit 2; }

echo "== kernel tests on the GPU"
timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/ops/test_triton.py \
    -k "half_precision or (gradients_match_primal and linear) or gradients_float64" \
    --junitxml "$OUT/tests.xml" 2>&1 | tee "$OUT/tests.txt"
tests_status=${PIPESTATUS[0]}

echo "== benchmark table"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout 240 "$PYTHON" benchmarks/bench_kernels.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
bench_status=${PIPESTATUS[0]}

echo "== done: tests exit status $tests_status, benchmark exit status $bench_status (124: time limit)"
echo "   results in $OUT: tests.txt, tests.xml, kernels.md, kernels.json, bench.txt, nvidia-smi.txt"
[[ $tests_status -eq 0 && $bench_status -eq 0 ]]
