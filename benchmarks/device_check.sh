#!/usr/bin/env bash
# The checks that need a GPU, in one run of about nine minutes (each step has its own time limit, so one that
# overruns costs only itself):
#   1. the invariant tests with the model families on CUDA (SORTEDNET_TEST_DEVICE=cuda, tests/models.py), one pytest
#      per file;
#   2. benchmarks/speculative.py --device cuda (targets trained for a short time on the GPU);
#   3. benchmarks/overhead.py --quick --device cuda, eager and compiled rows.
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
# One pytest per file, each with its own time limit, so a file that overruns costs only itself and every other file
# prints its own summary. pyproject's addopts hold -q, which cancels -v: they are replaced here, so each outcome is
# logged as it comes ("[gw3] PASSED tests/...") and a run cut short still says which tests failed. --timeout
# (pytest-timeout, on the GPU image) fails a hung test alone; the "device" hypothesis profile tries fewer inputs.
: > "$OUT/cuda_tests.log"
for spec in test_devices.py:40 test_invariants.py:70 test_autograd.py:40 test_export.py:40 test_submodel.py:30 \
            test_threads.py:40; do
  f=${spec%%:*}; limit=${spec##*:}
  SORTEDNET_TEST_DEVICE=cuda HYPOTHESIS_PROFILE=device timeout $limit $PY -m pytest -o addopts="--import-mode=importlib" \
    -p no:cacheprovider -p no:warnings -p no:benchmark -v -n 8 -rfE --tb=line --timeout 30 "tests/$f" \
    >> "$OUT/cuda_tests.log" 2>&1
  echo "tests/$f rc $?"
done
grep -E "(FAILED|ERROR) |Timeout|passed|failed" "$OUT/cuda_tests.log" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' \
  | cut -c1-200 | sort -u | tail -60

echo "== 2. speculative decoding"
timeout 190 $PY benchmarks/speculative.py --device cuda --minutes 0.8 --draft-minutes 0.3 \
  > "$OUT/speculative.log" 2>&1
echo "speculative rc $?"; keep; tail -30 "$OUT/speculative.log"

echo "== 3. overhead, eager and compiled rows"
timeout 80 $PY benchmarks/overhead.py --quick --device cuda > "$OUT/overhead_compiled.log" 2>&1
echo "overhead compiled rc $?"; keep; grep -A12 "## Summary" benchmarks/results/overhead_quick_cuda.md
