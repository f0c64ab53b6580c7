"""The ``demo`` collection: the demo model's held-out images, with their captions and tags, in a collection the
gateway loads at start, so a fresh ``make serve`` has something to search (``hqclip demo build`` seeds it).

Each item keeps its caption and tags and gets a small JPEG thumbnail (``attributes.thumbnail``, what the web page
shows; ``hqclip-client ingest`` stores the same), from copies of the shards written once into the work folder.

Whichever backend stores collections (``HQCLIP_INDEX__BACKEND``: FAISS folders or Milvus), through its catalog.
Idempotent and resumable: the marker ``<index dir>/.demo-seed.json`` says which model embedded the collection and
whether seeding finished. A rerun resumes an interrupted seed (``hqclip index build`` skips stored ids), keeps a
finished one, and rebuilds it when the demo model changed (another fingerprint: old vectors answer nothing right).
A collection named ``demo`` that no demo build made is the user's and is left alone.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from hqclip.jobs.index_build import build
from hqclip.repo.manifest import load_manifest
from hqclip.shards import json_member, read_tar, write_tar
from services.index.collection import Catalog, CollectionNotFound
from services.index.manager import open_catalog
from services.settings import Settings

NAME = "demo"
MARKER = ".demo-seed.json"
THUMBNAIL_PIXELS = 128


@dataclass
class Seeded:
    where: str  # the collection's folder, or its Milvus URI
    count: int
    action: str  # built, resumed, kept, rebuilt, or foreign (a user's own collection named demo: untouched)

    def __str__(self) -> str:
        if self.action == "foreign":
            return (f"collection: {self.where} was not made by the demo build; kept as it is (delete it and run "
                    f"`hqclip demo build` again for the demo's images)")
        return f"collection: {self.where}, {self.count} held-out images ({self.action})"


def marker_path(settings: Settings) -> Path:
    return Path(settings.index.dir) / MARKER


def thumbnail(image: bytes) -> str:
    """A small JPEG data URI of an encoded image."""
    with Image.open(io.BytesIO(image)) as opened:
        small = opened.convert("RGB")
    small.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def with_thumbnails(shard: Path, folder: Path) -> Path:
    """``folder/<shard name>``: the shard with a thumbnail in each sample's JSON (written once, atomically)."""
    out = folder / Path(shard).name
    if not out.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_tar(out, ((s.key, {**s.members, "json": json_member({**s.meta, "thumbnail": thumbnail(s.image)})})
                        for s in read_tar(Path(shard)) if s.image is not None))
    return out


def seed(shards: list[Path], settings: Settings, work: Path, progress: bool = True) -> Seeded:
    """Embed the held-out ``shards`` (copied with thumbnails into ``work``) into collection ``demo`` of the
    configured backend with the model ``settings.model`` of ``settings.model_repo``. Raises CollectionBusy while a
    gateway holds the (FAISS) collection."""
    manifest = load_manifest(settings.model_repo, settings.model)
    marker = marker_path(settings)
    where = (f"{settings.index.milvus_uri} (Milvus)" if settings.index.backend == "milvus"
             else str(Path(settings.index.dir) / NAME))
    identity = {"model": manifest.name, "fingerprint": manifest.fingerprint}
    seeded = json.loads(marker.read_text()) if marker.is_file() else None
    same_model = seeded is not None and all(seeded.get(k) == v for k, v in identity.items())
    catalog = open_catalog(settings.index)
    try:
        action, count = _prepare(catalog, settings, seeded, same_model)
    finally:
        catalog.close()
    if action in ("foreign", "kept"):
        return Seeded(where, count, action)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**identity, "complete": False}))
    count = 0
    for shard in shards:
        count = build(with_thumbnails(Path(shard), Path(work)), NAME, settings, progress=progress).count
    marker.write_text(json.dumps({**identity, "complete": True}))
    return Seeded(where, count, action)


def _prepare(catalog: Catalog, settings: Settings, seeded: dict | None, same_model: bool) -> tuple[str, int]:
    """What to do with the collection there now, and its count: built (none there), foreign, kept, resumed or
    rebuilt (dropped here)."""
    folder = Path(settings.index.dir) / NAME
    if settings.index.backend == "faiss" and folder.exists() and not (folder / "meta.sqlite").is_file():
        shutil.rmtree(folder)  # ours or not, a folder interrupted before its first write holds nothing
    if not catalog.exists(NAME):
        return "built", 0
    if seeded is None:
        return "foreign", 0
    try:
        collection = catalog.open(NAME)  # CollectionBusy while a gateway serves it: the caller says so
    except CollectionNotFound:  # an alias named demo: the user's
        return "foreign", 0
    if not same_model:
        catalog.drop(collection)
        return "rebuilt", 0
    count = collection.count
    collection.close(snapshot=False)
    return ("kept" if seeded.get("complete") else "resumed"), count
