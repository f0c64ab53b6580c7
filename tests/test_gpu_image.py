"""The GPU gateway image's requirement set (docker/gpu_requirements.py) and its Dockerfile.

`make check-gpu-extra` resolves the set against the package index (pip --dry-run); these check, offline, that the
set is hqclip[serve] with the gpu extra in place of the CPU builds, that a resolution pulling a CPU build back in
is refused, and that docker/Dockerfile.gateway-gpu installs exactly that set on a CUDA runtime, without torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docker" / "gpu_requirements.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def report(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"install": [{"metadata": {"name": n, "version": "1"}} for n in names]}))
    return path


def test_the_set_is_serve_with_the_gpu_builds_in_place_of_the_cpu_ones():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lines = run().stdout.splitlines()
    names = [line.split(">")[0].split("=")[0].split("[")[0].split("<")[0] for line in lines]
    assert "faiss-cpu" not in names and "onnxruntime" not in names
    assert "milvus-lite" not in names and "pymilvus" in names  # milvus-lite requires faiss-cpu; a server does not
    assert {"faiss-gpu-cu12", "onnxruntime-gpu"} <= set(names)
    kept = [r for r in extras["serve"] if not r.startswith(("faiss-cpu", "onnxruntime>", "milvus-lite"))]
    assert set(kept) | set(extras["gpu"]) <= set(lines)
    assert len(lines) == len(set(lines))


def test_check_refuses_a_resolution_that_brings_a_cpu_build_back(tmp_path):
    assert run("--check", str(report(tmp_path, ["faiss-gpu-cu12", "onnxruntime-gpu", "numpy"]))).returncode == 0
    bad = run("--check", str(report(tmp_path, ["faiss-gpu-cu12", "onnxruntime-gpu", "onnxruntime"])))
    assert bad.returncode != 0 and "onnxruntime would be installed" in bad.stderr
    missing = run("--check", str(report(tmp_path, ["faiss-gpu-cu12", "faiss_cpu"])))
    assert "faiss-cpu would be installed" in missing.stderr
    assert "onnxruntime-gpu would not be installed" in missing.stderr


def test_dockerfile_installs_the_set_on_a_cuda_runtime_and_refuses_torch():
    text = (ROOT / "docker" / "Dockerfile.gateway-gpu").read_text()
    assert "ARG CUDA_IMAGE=nvidia/cuda:12." in text and "-cudnn-runtime-" in text  # CUDA 12, like both GPU wheels
    assert "python3.11 docker/gpu_requirements.py > requirements-gpu.txt" in text
    assert "-r requirements-gpu.txt" in text and "--no-deps ." in text  # hqclip itself adds no dependency
    assert '! python -c "import torch"' in text
    assert "! pip show --quiet faiss-cpu" in text and "! pip show --quiet onnxruntime " in text
