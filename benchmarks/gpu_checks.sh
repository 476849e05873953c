#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one command of a few minutes: the kernels' compiled test tier
# (-m gpu), the Triton target's kernel-cost table and the quantized-GEMM benchmark at 8192^2.
# Writes logs and JSON under $OUT (default /tmp/qc-gpu); uses the machine's own torch and triton.
#
#     OUT=/tmp/qc-gpu bash benchmarks/gpu_checks.sh
#
# Then copy $OUT/kernel_costs.json to codegen/triton/kernel_costs.json and
# $OUT/triton_gemm_<gpu>.json to benchmarks/results/.
set -u
OUT=${OUT:-/tmp/qc-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
cd "$(dirname "$0")/.."
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import torch, triton, onnx, onnxruntime; print("torch", torch.__version__, "triton", triton.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__)'
  python3 -m pip install -q --no-deps --no-build-isolation -e . && echo "qcompiler installed"
} > "$OUT/machine.txt" 2>&1
echo "== gpu tests"
timeout "${GPU_TESTS_S:-120}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/triton > "$OUT/gpu_tests.log" 2>&1
echo "exit $?"; tail -3 "$OUT/gpu_tests.log"
echo "== kernel costs"
timeout "${COSTS_S:-220}" python3 benchmarks/triton_kernel_costs.py --json "$OUT/kernel_costs.json" > "$OUT/kernel_costs.log" 2>&1
echo "exit $?"; tail -4 "$OUT/kernel_costs.log"
echo "== gemm"
timeout "${GEMM_S:-160}" python3 benchmarks/triton_gemm.py --out "$OUT" --quick --sweep mini --budget-s 110 > "$OUT/gemm.log" 2>&1
echo "exit $?"; tail -14 "$OUT/gemm.log"
