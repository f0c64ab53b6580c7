#!/usr/bin/env bash
# The virtualenv the test Triton server runs in (tests/servers/triton_serve.py).
# nvidia-pytriton bundles a real tritonserver but needs numpy<2, so it lives apart from .venv.
# Idempotent: a complete venv is left alone (~1 s); otherwise it is created or completed (~30 s).
# Usage: bash tests/servers/triton_env.sh    (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/build/venvs/triton"
PYTHON="${PYTHON:-python3}"
CHECK='import numpy, onnxruntime, pytriton.triton; assert numpy.__version__ < "2", numpy.__version__'

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    echo "triton venv ready: $VENV"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "nvidia-pytriton==0.7.0" "onnxruntime>=1.17" "numpy<2"
"$VENV/bin/python" -c "$CHECK"
echo "triton venv ready: $VENV"
