#!/usr/bin/env bash
# Idempotent install: a CPU machine gets the CPU torch wheel, never a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install -q torch
  else
    $PY -m pip install -q "torch==2.13.0"
  fi
fi
EXTRAS=${1:-dev}
CHECK="import mfm_fast, einops, safetensors, tqdm, matplotlib, pytest, sklearn, hypothesis, pytest_benchmark, diffusers"
case ",${EXTRAS}," in
  # torchvision is imported through mfm_fast's guard, which PyPI's wheel needs beside a CPU torch (_torchvision.py)
  *,rewards,*) CHECK="${CHECK}; from mfm_fast._torchvision import ensure_torchvision; ensure_torchvision(); \
import torchvision, transformers, open_clip, imscore" ;;
esac
# reinstall when a dependency is missing or `mfm_fast` resolves to another checkout than this one
if ! $PY -c "${CHECK}" 2>/dev/null \
   || ! $PY -m pip show -q mfm_fast >/dev/null 2>&1 \
   || [ "$(cd / && $PY -c 'import mfm_fast, os; print(os.path.dirname(os.path.dirname(os.path.realpath(mfm_fast.__file__))))' 2>/dev/null)" != "$(pwd -P)" ]; then
  # pin the torch that is installed: an extra asking for torchvision must take the torchvision built for it,
  # not replace a CPU torch by the newest (CUDA) one
  PIN=$(mktemp)
  trap 'rm -f "$PIN"' EXIT
  echo "torch==$($PY -c 'import torch; print(torch.__version__)')" > "$PIN"
  $PY -m pip install -q -c "$PIN" -e ".[${EXTRAS}]"
fi
