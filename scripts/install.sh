#!/usr/bin/env bash
# Installs spotserve and everything its tests need into ./.venv on a fresh machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's per-location warnings about missing local wheel folders are noise on these machines.
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and pinned: an unpinned torch pulls multi-GB CUDA wheels; 2.13.0 is the CPU wheel.
pip install -q torch==2.13.0 -r requirements-dev.txt 2>&1 | grep -v "is ignored" || true
python -c "import torch, numpy, scipy, mpi4py" || { echo "install.sh: dependencies failed to install" >&2; exit 1; }
# --no-build-isolation: build against the torch just installed (isolation would fetch another).
pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "is ignored" || true
python -c "import spotserve.ops" || { echo "install.sh: spotserve._C failed to build or import" >&2; exit 1; }
echo "install.sh: spotserve installed in $(pwd)/.venv"
