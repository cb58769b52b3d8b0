#!/usr/bin/env bash
# Run the kernel checks that need no GPU against another triton release (default 3.6.0, the GPU image's):
# the interpreter tier (each kernel against its _ref) and the sm_90 ahead-of-time compile of every XL/2 launch.
# A throw-away venv layered on this environment holds that triton. Usage: scripts/check_triton.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.6.0}
VENV=${TMPDIR:-/tmp}/mfm_fast_triton_${VERSION}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  $PY -m venv --system-site-packages "$VENV"
fi
# older interpreters index NumPy arrays in ways NumPy >= 2.3 rejects; the compiler path does not use NumPy
"$VENV/bin/python" -m pip install -q "triton==${VERSION}" "numpy<2.3"
"$VENV/bin/python" -c "import triton; print('triton', triton.__version__)"
"$VENV/bin/python" -m pytest tests/test_ops_*.py tests/test_dit_triton.py tests/test_particles.py tests/test_aot.py \
  -q -p no:cacheprovider
