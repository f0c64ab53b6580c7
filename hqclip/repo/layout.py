"""Where things live in a model repository: the one place that spells out its paths.

    <repo>/<name>.manifest.json              what services read first (hqclip/repo/manifest.py)
    <repo>/<name>_image/<version>/model.onnx image tower   (+ <repo>/<name>_image/config.pbtxt for Triton)
    <repo>/<name>_text/<version>/model.onnx  text tower     (+ config.pbtxt, the tokenizer file)
    <repo>/<name>_tags/<version>/model.onnx  short-tag head (when the model has one)
    <repo>/<tower>_<precision>/...           a reduced-precision variant of a tower, same shape

Triton reads ``<model>/<version>/model.onnx`` (its model-repository convention); exports write version 1, or with
``hqclip export --version next`` a new version beside the others (the manifest names the one to serve; the model-level
files, config.pbtxt and the tokenizer, are shared by the versions and replaced with the newest's).
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_SUFFIX = ".manifest.json"
VERSION = 1
ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"


def manifest_path(repo: Path, name: str) -> Path:
    return Path(repo) / f"{name}{MANIFEST_SUFFIX}"


def image_model(name: str) -> str:
    return f"{name}_image"


def text_model(name: str) -> str:
    return f"{name}_text"


def tags_model(name: str) -> str:
    return f"{name}_tags"


def variant_model(fp32_model: str, precision: str) -> str:
    """The Triton model name of a tower's ``precision`` variant."""
    return f"{fp32_model}_{precision}"


def onnx_path(repo: Path, model: str, version: int = VERSION) -> Path:
    """The ONNX file of Triton model ``model`` (a tower, a variant or a tag head)."""
    return Path(repo) / model / str(version) / ONNX_FILE


def versions(repo: Path, model: str) -> list[int]:
    """The version folders of ``model`` in ``repo``, newest first."""
    folder = Path(repo) / model
    found = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    return sorted(found, reverse=True)
