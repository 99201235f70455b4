#!/usr/bin/env bash
# One call on the 2-GPU device machine (nvidia-h100-x2): the live reconfiguration benchmark (issue #9 items
# 2-4), scripts/bench_live_gpu.py: controller + one worker per GPU, forced (dp,pp,tp) changes with requests in
# flight, the reparallelization baseline from a cold page cache, a SIGKILL without notice.
#   usage: bash scripts/device_live_gpu.sh                   (GPU; carry .devcarry to reuse a CUDA _C build
#                                                              and prometheus_client if the image lacks it)
#          CPU_REHEARSAL=1 bash scripts/device_live_gpu.sh   (gloo, opt-tiny, fp32, no build)
# Env: DEADLINE_S (default 345) bounds the whole script; BENCH_ARGS go to the bench (e.g. "--model opt-1.3b"
# to save device time, "--phases checkpoint,p2p,spotserve,kill"); MODEL_ROOT holds the checkpoints (default
# /var/tmp/spotserve-live-gpu, one folder per model, reused by a later call on a warm machine). Writes under $OUT: env.log,
# bench_live_gpu.log, h100x2-live.json (partial JSON as phases finish), the workers' logs on failure.
set -uo pipefail
# NVLink multicast off in every process (the device README says why); the workers inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/spotserve-live-gpu-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
PY=${PY:-python3}
T0=$(date +%s)
left() { echo $(( ${DEADLINE_S:-345} - ($(date +%s) - T0) )); }
WORK=$(mktemp -d /tmp/spotserve-live-work.XXXX)

if [[ -n "${CPU_REHEARSAL:-}" ]]; then
  ARGS="--device cpu"
else
  MODEL_ROOT=${MODEL_ROOT:-/var/tmp/spotserve-live-gpu}
  mkdir -p "$MODEL_ROOT"
  { nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv
    nvidia-smi topo -m
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
    df -hT "$MODEL_ROOT" /tmp; free -g | head -2; id -u
  } >"$OUT/env.log" 2>&1
  cat "$OUT/env.log"
  if ! $PY -c "import prometheus_client" 2>/dev/null; then
    if [[ -d .devcarry/pylib/prometheus_client ]]; then
      export PYTHONPATH=$PWD:$PWD/.devcarry/pylib; echo "prometheus_client: from .devcarry/pylib"
    else
      echo "prometheus_client is missing and .devcarry/pylib was not carried: the live service cannot start"; exit 1
    fi
  fi
  start=$(date +%s)
  # a build left in the tree by an earlier call on a warm machine wins over a carried one (which may be stale)
  $PY -c "import spotserve.ops as o, spotserve.engine.engine; assert o.WITH_CUDA" >/dev/null 2>&1 \
    || cp .devcarry/twogpu/_C.cpython-312-*.so spotserve/ 2>/dev/null
  if $PY -c "import spotserve.ops as o, spotserve.engine.engine; assert o.WITH_CUDA" >>"$OUT/env.log" 2>&1; then
    echo "build: using the carried CUDA build of spotserve._C"
  else
    rm -f spotserve/_C.cpython-312-*.so
    SPOTSERVE_CUDA=1 MAX_JOBS=16 CMAKE_CUDA_ARCHITECTURES=90 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
      $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
      && $PY -c "import spotserve.ops as o; assert o.WITH_CUDA, 'built without CUDA'" >>"$OUT/build.log" 2>&1 \
      || { echo "build failed:"; tail -30 "$OUT/build.log"; exit 1; }
  fi
  echo "build: $(( $(date +%s) - start )) s"
  ARGS="--device cuda --model-root $MODEL_ROOT"
fi

rc=0
timeout -k 10 "$(( $(left) - 5 > 30 ? $(left) - 5 : 30 ))" \
  $PY scripts/bench_live_gpu.py $ARGS --work-dir "$WORK" --deadline-s "$(( $(left) - 20 > 20 ? $(left) - 20 : 20 ))" \
    --json "$OUT/h100x2-live.json" ${BENCH_ARGS:-} 2>&1 \
  | grep --line-buffered -v -E "Warning|warn\(|warnings.warn" | tee "$OUT/bench_live_gpu.log" || rc=1
# the workers' and fork servers' logs (a worker's own errors show only there): spotserve-i0-i0-g0.log, ...
for f in "$WORK"/live-*/logs/*/*.log; do
  [[ -f "$f" ]] && cp "$f" "$OUT/$(basename "$(dirname "$(dirname "$(dirname "$f")")")" | cut -d- -f2)-$(basename "$(dirname "$f")")-$(basename "$f")"
done
rm -rf "$WORK"
echo "device_live_gpu.sh: $(( $(date +%s) - T0 )) s since start, rc=$rc"
exit $rc
