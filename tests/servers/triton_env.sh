#!/usr/bin/env bash
# The virtualenv the test Triton server runs in (tests/servers/triton_serve.py).
# nvidia-pytriton bundles a real tritonserver but needs numpy<2, so it lives apart from .venv.
# Idempotent: re-running it only installs what is missing. Usage: bash tests/servers/triton_env.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${HQCLIP_TRITON_VENV:-$ROOT/build/venvs/triton}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "nvidia-pytriton==0.7.0" "onnxruntime>=1.17" "numpy<2"
"$VENV/bin/python" -c "import pytriton, onnxruntime, numpy; print('triton venv ready:', '$VENV', 'numpy', numpy.__version__)"
