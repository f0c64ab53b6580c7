"""Webdataset shards, the format every offline job reads and writes: one reader, one writer, one image-suffix list.

A shard is a tar of samples, each a group of members sharing a key (the member's path up to the first dot of its
base name): ``{key}.jpg|png|webp|...`` + ``{key}.json`` (img2dataset's metadata, or the VLM-150M fields ``desc``,
``neg_desc``, ``tags``, ``neg_tags``) + optionally ``{key}.txt`` (an alt text). Torch-free and dependency-free, so
training, the jobs and the services can all use it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
ANNOTATION_FIELDS = ("desc", "neg_desc", "tags", "neg_tags")


def is_image(path: Path) -> bool:
    """A file whose suffix is one of the image formats the shards and the folder readers take."""
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and path.is_file()


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if is_image(p))


@dataclass
class Sample:
    key: str
    members: dict[str, bytes]  # extension -> bytes, as in the shard ("jpg", "json", "txt", ...)
    meta: dict  # the JSON member (img2dataset's metadata, the VLM-150M fields), {} when absent or not an object
    image_ext: str | None
    caption: str | None  # the JSON's "caption", else the .txt member

    @property
    def image(self) -> bytes | None:
        return self.members.get(self.image_ext) if self.image_ext else None


def sample(key: str, members: dict[str, bytes], meta: dict | None = None) -> Sample:
    """A sample from its members; ``meta`` overrides the JSON member (for samples read from a folder + CSV)."""
    if meta is None:
        try:
            meta = json.loads(members["json"]) if "json" in members else {}
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    caption = meta.get("caption")
    if caption is None and "txt" in members:
        caption = members["txt"].decode("utf-8", errors="replace").strip()
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    return Sample(key, members, meta, image_ext, caption)


def _key_and_ext(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_tar(path: Path) -> Iterator[Sample]:
    """The samples of a shard, in order: members grouped by key."""
    key, members = None, {}
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            this, ext = _key_and_ext(info.name)
            if this != key and key is not None:
                yield sample(key, members)
                members = {}
            key = this
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield sample(key, members)


def count_samples(path: Path) -> int:
    """How many samples a shard holds, from the tar headers alone."""
    with tarfile.open(path) as tar:
        return len({_key_and_ext(info.name)[0] for info in tar if info.isfile()})


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write ``(key, members)`` samples as a shard, atomically: a temporary file, fsync, rename. A reader never sees
    a half-written shard, so "the output shard exists" is a safe resume test. Returns how many samples it wrote."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tarfile.open(tmp, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            count += 1
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


def json_member(meta: dict) -> bytes:
    """A sample's JSON member as the writers store it (UTF-8, non-ASCII kept)."""
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")
