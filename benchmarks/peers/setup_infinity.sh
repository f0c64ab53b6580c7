#!/usr/bin/env bash
# infinity-emb in its own virtualenv (it pins numpy<2; aiohttp is needed for images), for benchmarks/cpu_peers.py.
# open_clip_torch (no deps) only writes the tokenizer files of the Hugging Face CLIP folder (hf_clip.py).
set -euo pipefail
VENV=${1:-build/venvs/infinity}
test -x "$VENV/bin/python" || python3.11 -m venv "$VENV"
"$VENV/bin/pip" install --quiet "infinity-emb[server,torch,vision]==0.0.78" "numpy<2" aiohttp \
    "torch==2.14.1" "torchvision==0.29.1" ftfy
"$VENV/bin/pip" install --quiet --no-deps "open_clip_torch==3.3.0"
