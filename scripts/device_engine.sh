#!/usr/bin/env bash
# One call on the GPU device machine for the engine: build spotserve._C with CUDA against the image's
# torch, run the engine's gpu tests, write the H100 profile and run the engine benchmark.
#   usage: bash scripts/device_engine.sh [build] [test] [profile] [bench]   (default: all four)
# A carried spotserve/_C.cpython-312-*.so that imports with CUDA skips the build. Logs and JSON go to
# $OUT (at most 8 files come back): build log (+ the built .so), pytest log, profile JSON + log,
# bench JSON + log. DEADLINE_S (default 400) bounds the whole script: the bench stops 75 s before it,
# the profile gets the rest.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/spotserve-device-out}
mkdir -p "$OUT"
STEPS="${*:-build test profile bench}"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
PY=python3
T0=$(date +%s)
left() { echo $(( ${DEADLINE_S:-400} - ($(date +%s) - T0) )); }
rc=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} >"$OUT/build.log" 2>&1
head -3 "$OUT/build.log"

if [[ " $STEPS " == *" build "* ]]; then
  start=$(date +%s)
  if $PY -c "import spotserve.ops as o; assert o.WITH_CUDA" >>"$OUT/build.log" 2>&1; then
    echo "build: using the carried CUDA build of spotserve._C"
  else
    SPOTSERVE_CUDA=1 MAX_JOBS=16 CMAKE_CUDA_ARCHITECTURES=90 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
      $PY -m pip install --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 \
      && $PY -c "import spotserve.ops as o; assert o.WITH_CUDA, 'built without CUDA'" >>"$OUT/build.log" 2>&1 \
      || { echo "full build failed:"; grep -iE "error" "$OUT/build.log" | head -10
           echo "building the ops alone (scripts/device_gpu.sh's fallback)"
           bash scripts/device_gpu.sh build >>"$OUT/build.log" 2>&1 \
             && cp /tmp/spotserve-ops-only/spotserve/_C.cpython-3*.so spotserve/ \
             && $PY -c "import spotserve.ops as o; assert o.WITH_CUDA" || { tail -30 "$OUT/build.log"; exit 1; }; }
    cp spotserve/_C.cpython-3*.so "$OUT/" 2>/dev/null
    echo "build: $(( $(date +%s) - start )) s"
  fi
fi

if [[ " $STEPS " == *" test "* ]]; then
  start=$(date +%s)
  timeout "${TEST_TIMEOUT:-80}" $PY -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/gpu/test_engine_gpu.py \
    >"$OUT/pytest.log" 2>&1 || rc=1
  grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest.log" | head -30
  tail -2 "$OUT/pytest.log"
  echo "tests: $(( $(date +%s) - start )) s"
fi

if [[ " $STEPS " == *" bench "* ]]; then
  start=$(date +%s)
  timeout "$(( $(left) - 75 > 30 ? $(left) - 75 : 30 ))" $PY scripts/bench_engine.py --json "$OUT/h100-engine.json" ${BENCH_ARGS:-} 2>&1 \
    | grep --line-buffered -v -E "Warning|warn\(|output = func" | tee "$OUT/bench.log" || rc=1
  echo "bench: $(( $(date +%s) - start )) s"
fi
if [[ " $STEPS " == *" profile "* ]]; then
  start=$(date +%s)
  timeout "$(( $(left) > 20 ? $(left) : 20 ))" $PY -m spotserve.profile --model opt-6.7b --out "$OUT/opt-6.7b.json" \
    --prefill-batches 1,2,4,8 >"$OUT/profile.log" 2>&1 || rc=1
  tail -12 "$OUT/profile.log"
  echo "profile: $(( $(date +%s) - start )) s"
fi

exit $rc
