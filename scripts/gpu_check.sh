#!/usr/bin/env bash
# The GPU checks, in one run of at most ~8 minutes on one H100-class GPU (no network needed):
#   1. tests/test_cuda.py: bf16 weights on CUDA, the parity goldens within bf16 tolerances (answer, chat,
#      text-to-image, edit through the public API), device-side decoding, the loading memory bound;
#      tests/test_quantize_cuda.py: each quantization mode (int8, int8-weight, int4-weight, fp8) against the goldens;
#   2. benchmarks/gpu.py: cheers-1.5b (random bf16 weights) loaded from a sharded checkpoint, a 512 px T2I step with
#      CFG (s/step, peak memory, fraction of the bf16 matmul peak measured in the same run), decode tokens/s, one
#      bf16 training step.
# Usage: scripts/gpu_check.sh   (results also go to $OUT when it is set)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/cheers-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if ! "$PY" -c "import cheers" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[test]" || exit 1  # the machine's own CUDA torch stays as it is
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
CHEERS_SHARED="${CHEERS_SHARED:-$(pwd)/../shared}" timeout 240 "$PY" -m pytest -q -rs tests/test_cuda.py \
  tests/test_quantize_cuda.py 2>&1 \
  | tail -25 | tee "$OUT/test_cuda.txt"
(cd benchmarks && timeout 300 "$PY" gpu.py 2>&1 | tail -20 | tee "$OUT/gpu_bench.txt")
