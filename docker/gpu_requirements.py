"""The GPU gateway's requirement set: hqclip[serve] with the CPU builds that the `gpu` extra replaces taken out.

faiss-cpu and faiss-gpu-cu12 both install the module ``faiss``, onnxruntime and onnxruntime-gpu both
``onnxruntime``: installed side by side, whichever pip unpacks last overwrites part of the other. milvus-lite (the
embedded Milvus) requires faiss-cpu, so it stays out too: a GPU host's gateway keeps collections in FAISS-GPU or on a
Milvus server (``HQCLIP_INDEX__MILVUS_URI=http://...``). An extra cannot take a package out of another, so this
prints pyproject.toml's dependencies + serve - the replaced CPU builds - milvus-lite + gpu, one per line, for
docker/Dockerfile.gateway-gpu to install and `make check-gpu-extra` to resolve:

    python docker/gpu_requirements.py > gpu.txt
    pip install --dry-run --ignore-installed --only-binary=:all: --report report.json -r gpu.txt
    python docker/gpu_requirements.py --check report.json    # fails if the resolution still pulls a CPU build

Standard library only (the image runs it before anything is installed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
REPLACES = {"faiss-cpu": "faiss-gpu-cu12", "onnxruntime": "onnxruntime-gpu"}  # serve's CPU build: its GPU build
LEFT_OUT = {"milvus-lite"}  # serve's packages that pull a CPU build in (milvus-lite requires faiss-cpu)


def name(requirement: str) -> str:
    """The canonical project name of a PEP 508 requirement (``"uvicorn[standard]>=0.29"`` -> ``"uvicorn"``)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)[1]).lower()


def requirements(pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    gpu = {name(r) for r in extras["gpu"]}
    missing = set(REPLACES.values()) - gpu
    if missing:
        raise SystemExit(f"pyproject.toml's gpu extra lacks {sorted(missing)}, which replace {sorted(REPLACES)}")
    serve = [r for r in extras["serve"] if name(r) not in REPLACES and name(r) not in LEFT_OUT]
    return project["dependencies"] + serve + extras["gpu"]


def check(report: Path) -> list[str]:
    """What is wrong with a `pip install --report` of the set: a CPU build pulled in, or a GPU build left out."""
    installed = {name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    return ([f"{cpu} would be installed (by a dependency): it overwrites {gpu}" for cpu, gpu in REPLACES.items()
             if cpu in installed]
            + [f"{gpu} would not be installed" for gpu in REPLACES.values() if gpu not in installed])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", type=Path, metavar="REPORT", help="check pip's --report JSON of this set instead")
    args = parser.parse_args()
    if args.check is None:
        print("\n".join(requirements()))
        return
    problems = check(args.check)
    if problems:
        sys.exit("GPU requirement set: " + "; ".join(problems))
    print(f"GPU requirement set resolves without CPU builds ({args.check})")


if __name__ == "__main__":
    main()
