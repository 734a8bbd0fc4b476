#!/usr/bin/env bash
# The checks that need a GPU, in one run of about nine and a half minutes (each step has its own time limit, so one that
# overruns costs only itself):
#   1. the invariant tests with the model families on CUDA (SORTEDNET_TEST_DEVICE=cuda, tests/models.py);
#   2. benchmarks/overhead.py --quick --device cuda, eager, then with the compiled rows;
#   3. benchmarks/speculative.py --device cuda (targets trained for a short time on the GPU).
# Results land in benchmarks/results/*_cuda.md and are copied to $OUT (default /tmp/sortednet_device).
#
#     bash benchmarks/device_check.sh
set -u
OUT=${OUT:-/tmp/sortednet_device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=src PYTHONUNBUFFERED=1
keep() { cp benchmarks/results/*_cuda.md "$OUT"/ 2>/dev/null; true; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== 1. invariant tests on CUDA"
# -v: each outcome is logged as it comes (a run cut short by its time limit still says which tests failed);
# --timeout (pytest-timeout, on the GPU image): a test that hangs fails alone
SORTEDNET_TEST_DEVICE=cuda timeout 170 $PY -m pytest -p no:cacheprovider -p no:warnings -v -n 8 -rfE --tb=short \
  --timeout 60 \
  tests/test_devices.py tests/test_invariants.py tests/test_autograd.py tests/test_export.py tests/test_threads.py \
  tests/test_submodel.py > "$OUT/cuda_tests.log" 2>&1
echo "tests rc $?"; grep -E "(FAILED|ERROR) |passed|failed" "$OUT/cuda_tests.log" | cut -c1-220 | tail -40

echo "== 2a. overhead, eager"
timeout 80 $PY benchmarks/overhead.py --quick --no-compile --device cuda > "$OUT/overhead_eager.log" 2>&1
echo "overhead eager rc $?"; tail -3 "$OUT/overhead_eager.log"; grep -A12 "## Summary" benchmarks/results/overhead_quick_cuda.md
cp benchmarks/results/overhead_quick_cuda.md "$OUT/overhead_quick_cuda_eager.md" 2>/dev/null

echo "== 3. speculative decoding"
timeout 170 $PY benchmarks/speculative.py --device cuda --minutes 1 --draft-minutes 0.4 \
  > "$OUT/speculative.log" 2>&1
echo "speculative rc $?"; keep; tail -30 "$OUT/speculative.log"

echo "== 2b. overhead, with the compiled rows"
timeout 80 $PY benchmarks/overhead.py --quick --device cuda > "$OUT/overhead_compiled.log" 2>&1
echo "overhead compiled rc $?"; keep; grep -A12 "## Summary" benchmarks/results/overhead_quick_cuda.md
