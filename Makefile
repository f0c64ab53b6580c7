# Two commands for a fresh machine:  `make serve` (demo gateway)  and  `make test` (the whole suite).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := tuxpaint-stamps-default tuxpaint-data mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 \
	plasma-workspace-wallpapers opencv-doc gcompris-qt-data wordnet-base fonts-noto-color-emoji chromium

.PHONY: serve test test-fast lint serve-only venv demo-model apt test-servers check-gpu-extra clean

# --- environments ---
$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[serve,train,ray,dev]' -e 'clients/python[cli]'
	touch $(STAMP)

venv: $(STAMP)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# Real servers the slow tests start: vLLM (its own venv + a tiny VLM built here) and Triton (pytriton's venv).
test-servers: venv
	bash tests/servers/setup_vllm.sh
	bash tests/servers/triton_env.sh

# --- the demo model ---
# ... and the `demo` collection of its held-out images (hqclip/jobs/demo_collection.py), in the folder `serve` uses.
INDEX_DIR := $(or $(HQCLIP_INDEX__DIR),data/collections)
demo-model: venv apt
	test -f model_repo/demo.manifest.json && grep -qs '"complete": true' $(INDEX_DIR)/.demo-seed.json \
		|| $(BIN)/hqclip demo build

# --- the two commands ---
serve: demo-model
	HQCLIP_MODEL_REPO=model_repo $(BIN)/hqclip serve

test: venv apt test-servers lint serve-only
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .

# A serve-only install (what the gateway image has): no torch, and the CLI still works or names the extra to add.
SERVE_ONLY := build/venvs/serve-only
serve-only:
	test -x $(SERVE_ONLY)/bin/python || $(PYTHON) -m venv $(SERVE_ONLY)
	$(SERVE_ONLY)/bin/pip install --quiet --disable-pip-version-check '.[serve]'
	! $(SERVE_ONLY)/bin/python -c 'import torch' 2>/dev/null
	$(SERVE_ONLY)/bin/hqclip --help >/dev/null
	$(SERVE_ONLY)/bin/hqclip serve --help >/dev/null
	$(SERVE_ONLY)/bin/hqclip export --help >/dev/null
	if $(SERVE_ONLY)/bin/hqclip export ViT-B-32 --out build/serve-only-repo 2>build/serve-only.log; then exit 1; fi
	cat build/serve-only.log && grep -q "pip install 'hqclip\[train\]'" build/serve-only.log

# Fast lane for your own loop: no real servers, no training.
test-fast: venv
	$(BIN)/pytest -m "not slow"

# The GPU gateway image's requirements (hqclip[serve] with the gpu extra in place of faiss-cpu and onnxruntime)
# resolve on this Python, and pull in no CPU build: pip --dry-run, nothing installed (docker/gpu_requirements.py).
check-gpu-extra: venv
	mkdir -p build
	$(BIN)/python docker/gpu_requirements.py > build/gpu-requirements.txt
	$(BIN)/pip install --quiet --dry-run --ignore-installed --only-binary=:all: \
		--report build/gpu-requirements.json -r build/gpu-requirements.txt
	$(BIN)/python docker/gpu_requirements.py --check build/gpu-requirements.json

clean:
	rm -rf build $(VENV)
