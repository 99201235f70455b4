#!/usr/bin/env bash
# One call on the 2-GPU device machine (nvidia-h100-x2): build spotserve._C with CUDA, then run
# scripts/bench_two_gpu.py as two NCCL processes (engine tp=2 / pp=2 vs tp=1, p2p bandwidth, executor).
#   usage: bash scripts/device_two_gpu.sh            (GPU)
#          CPU_REHEARSAL=1 bash scripts/device_two_gpu.sh   (gloo, opt-tiny, no build)
# A CUDA build of spotserve/_C for Python 3.12 carried in .devcarry/twogpu/ skips the build when it
# imports with CUDA. Writes under $OUT: build.log, bench_two_gpu.log, h100x2-reconfig.json.
# DEADLINE_S (default 400) bounds the whole script.
set -uo pipefail
# NVLink multicast off in every process (the device README says why); torchrun's children inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/spotserve-two-gpu-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
PY=${PY:-python3}
T0=$(date +%s)
left() { echo $(( ${DEADLINE_S:-400} - ($(date +%s) - T0) )); }

if [[ -n "${CPU_REHEARSAL:-}" ]]; then
  ARGS="--device cpu --model opt-tiny --timeout 60"
else
  ARGS="--device cuda --model opt-6.7b --timeout 180"
  { nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
    nvidia-smi topo -m
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
    $PY -c "import msgpack, safetensors; print('msgpack', msgpack.version, 'safetensors', safetensors.__version__)"
  } >"$OUT/build.log" 2>&1
  cat "$OUT/build.log"
  start=$(date +%s)
  # a build left in the tree by an earlier call on a warm machine wins over a carried one (which may be stale)
  $PY -c "import spotserve.ops as o, spotserve.engine.engine; assert o.WITH_CUDA" >/dev/null 2>&1 \
    || cp .devcarry/twogpu/_C.cpython-312-*.so spotserve/ 2>/dev/null
  if $PY -c "import spotserve.ops as o, spotserve.engine.engine; assert o.WITH_CUDA" >>"$OUT/build.log" 2>&1; then
    echo "build: using the carried CUDA build of spotserve._C"
  else
    rm -f spotserve/_C.cpython-312-*.so
    SPOTSERVE_CUDA=1 MAX_JOBS=16 CMAKE_CUDA_ARCHITECTURES=90 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
      $PY -m pip install --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 \
      && $PY -c "import spotserve.ops as o; assert o.WITH_CUDA, 'built without CUDA'" >>"$OUT/build.log" 2>&1 \
      || { echo "build failed:"; tail -30 "$OUT/build.log"; exit 1; }
  fi
  echo "build: $(( $(date +%s) - start )) s"
fi

rc=0
timeout -k 10 "$(( $(left) - 10 > 30 ? $(left) - 10 : 30 ))" \
  $PY -m torch.distributed.run --standalone --nproc_per_node 2 scripts/bench_two_gpu.py \
    --json "$OUT/h100x2-reconfig.json" $ARGS ${BENCH_ARGS:-} 2>&1 \
  | grep --line-buffered -v -E "Warning|warn\(|warnings.warn" | tee "$OUT/bench_two_gpu.log" || rc=1
echo "bench: $(( $(date +%s) - T0 )) s since start, rc=$rc"
exit $rc
