"""The model repository's manifest: the one contract between `hqclip export` and the services.

`hqclip export` writes ``<model_repo>/<name>.manifest.json`` next to the Triton model folders
``<name>_image``, ``<name>_text`` (and ``<name>_tags`` when the model has a tag head; hqclip/repo/layout.py).
Services read only this file and the files it names; they never import training code or torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from hqclip.repo.layout import MANIFEST_SUFFIX, VERSION, manifest_path

SCHEMA_VERSION = 1


class TowerIO(BaseModel):
    """One Triton model: its folder name and its tensor names."""

    model: str = Field(description="Triton model name (folder in the repository).")
    input: str = Field(description="Input tensor name.")
    output: str = Field(description="Output tensor name.")


class ImageSpec(TowerIO):
    """Image tower: uint8 NCHW pixels in, L2-normalised float32 embeddings out (normalises in-graph)."""

    size: tuple[int, int] = Field(description="(height, width) the tower takes.")
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"
    fill_color: int = 0
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class TokenizerSpec(BaseModel):
    kind: Literal["clip_bpe", "hf"] = Field(description="clip_bpe: open_clip's SimpleTokenizer; hf: tokenizers json.")
    file: str = Field(description="Path relative to the repository: BPE merges (.txt.gz) or tokenizer.json.")
    context_length: int
    clean: Literal["lower", "whitespace", "canonicalize"] = "lower"
    pad_id: int = 0


class TextSpec(TowerIO):
    """Text tower: int64 token ids in (padded with pad_id), L2-normalised float32 embeddings out."""

    tokenizer: TokenizerSpec
    any_length: bool = Field(
        False, description="The tower takes ids of any length up to the context length, with the same embeddings: "
        "the services cut each batch after its longest text. False: always the full context length.")


class TagSpec(TowerIO):
    """Short-tag head: image embeddings in, per-tag probabilities out (sigmoid in-graph)."""

    vocabulary: list[str]


class Variant(BaseModel):
    """A reduced-precision copy of the towers, with the parity it measured at export."""

    image_model: str
    text_model: str
    runtime: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime", description="The in-process runtime that computes in this precision (services/backends/)."
    )
    parity: dict[str, float] = Field(default_factory=dict)
    evaluation: str = Field("", description="The real photos and texts the parity numbers were measured on.")


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    name: str
    architecture: str = Field(description="open_clip model name or a short description of the towers.")
    weights: str = Field(description="Where the weights came from; 'random' for an untrained demo.")
    description: str = ""
    embed_dim: int
    logit_scale: float = Field(description="exp(learned logit scale): the multiplier before softmax.")
    logit_bias: float | None = None
    max_batch_size: int
    precision: str = "fp32"
    image: ImageSpec
    text: TextSpec
    tags: TagSpec | None = None
    variants: dict[str, Variant] = Field(default_factory=dict, description="Other precisions, by name.")
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of each file, relative path -> hex.")
    created: dict[str, str] = Field(default_factory=dict, description="When, by what, with which versions.")

    @property
    def fingerprint(self) -> str:
        """The embedding space's identity: a digest of the fp32 towers' files (weights, tokenizer, configs).

        Two exports of the same weights share it, whatever version folder they went into (each path is digested
        as if in version 1); a retrained model of the same architecture does not, so a collection embedded by one
        model can refuse queries embedded by another.
        """
        towers = (self.image.model, self.text.model)
        digest = hashlib.sha256()
        for rel, sha in sorted(self.files.items()):
            model, *rest = rel.split("/")
            if model in towers and rest:
                if len(rest) > 1 and rest[0].isdigit():
                    rest[0] = str(VERSION)
                digest.update(f"{'/'.join([model, *rest])}={sha}\n".encode())
        return digest.hexdigest()[:16]

    def version(self, model: str) -> int:
        """The version folder of Triton model ``model`` among the files (``<model>/<version>/...``); else layout's
        (a manifest without checksums)."""
        for rel in self.files:
            parts = rel.split("/")
            if len(parts) == 3 and parts[0] == model and parts[1].isdigit():
                return int(parts[1])
        return VERSION

    def towers(self, precision: str) -> tuple[str, str]:
        """(image model, text model) names serving ``precision``; a clear error for one not exported."""
        if precision == self.precision:
            return self.image.model, self.text.model
        if precision in self.variants:
            variant = self.variants[precision]
            return variant.image_model, variant.text_model
        known = ", ".join([self.precision, *self.variants])
        raise ValueError(f"model '{self.name}' has no {precision} variant (it has: {known}); "
                         f"run `hqclip export --precision {precision}` or set HQCLIP_PRECISION to one of those")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_manifest(repo: Path, name: str | None) -> Path:
    """The manifest of ``name`` in ``repo``, or the only one there; a clear error otherwise."""
    repo = Path(repo)
    if name:
        path = manifest_path(repo, name)
        if not path.is_file():
            raise FileNotFoundError(f"no model '{name}' in {repo}: expected {path}; run `hqclip export` first")
        return path
    found = sorted(repo.glob(f"*{MANIFEST_SUFFIX}"))
    if not found:
        raise FileNotFoundError(f"no *{MANIFEST_SUFFIX} in {repo}: run `make demo-model` or `hqclip export`")
    if len(found) > 1:
        names = ", ".join(p.name.removesuffix(MANIFEST_SUFFIX) for p in found)
        raise ValueError(f"{repo} holds several models ({names}): set HQCLIP_MODEL to one of them")
    return found[0]


def load_manifest(repo: Path, name: str | None = None, verify: bool = False) -> Manifest:
    """Read and validate a manifest; with ``verify`` also check every file's checksum."""
    path = find_manifest(repo, name)
    manifest = Manifest.model_validate(json.loads(path.read_text()))
    if verify:
        for rel, expected in manifest.files.items():
            actual = sha256_file(Path(repo) / rel)
            if actual != expected:
                raise ValueError(f"{rel} does not match its checksum in {path.name}: re-run `hqclip export`")
    return manifest
