"""The ``demo`` collection: the demo model's held-out images, with their captions and tags, in a collection the
gateway loads at start, so a fresh ``make serve`` has something to search (``hqclip demo build`` seeds it).

Each item keeps its caption and tags and gets a small JPEG thumbnail (``attributes.thumbnail``, what the web page
shows; ``hqclip-client ingest`` stores the same), from copies of the shards written once into the work folder.

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
from services.index.faiss_sqlite import FaissCollection as Collection
from services.settings import Settings

NAME = "demo"
MARKER = ".demo-seed.json"
THUMBNAIL_PIXELS = 128


@dataclass
class Seeded:
    path: Path
    count: int
    action: str  # built, resumed, kept, rebuilt, or foreign (a user's own collection named demo: untouched)

    def __str__(self) -> str:
        if self.action == "foreign":
            return (f"collection: {self.path} was not made by the demo build; kept as it is (delete it and run "
                    f"`hqclip demo build` again for the demo's images)")
        return f"collection: {self.path}, {self.count} held-out images ({self.action})"


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
    """Embed the held-out ``shards`` (copied with thumbnails into ``work``) into collection ``demo`` under
    ``settings.index.dir`` with the model ``settings.model`` of ``settings.model_repo``. Raises CollectionBusy while
    a gateway holds the collection."""
    manifest = load_manifest(settings.model_repo, settings.model)
    folder, marker = Path(settings.index.dir) / NAME, marker_path(settings)
    identity = {"model": manifest.name, "fingerprint": manifest.fingerprint}
    seeded = json.loads(marker.read_text()) if marker.is_file() else None
    same_model = seeded is not None and all(seeded.get(k) == v for k, v in identity.items())
    action = "built"
    if folder.exists() and seeded is None:
        return Seeded(folder, 0, "foreign")
    if folder.exists() and not (folder / "meta.sqlite").is_file():
        shutil.rmtree(folder)  # ours, interrupted before its first write
    if folder.exists():
        collection = Collection.open(folder)  # CollectionBusy while a gateway serves it: the caller says so
        count = collection.count
        collection.close(snapshot=False)
        if same_model and seeded.get("complete"):
            return Seeded(folder, count, "kept")
        if same_model:
            action = "resumed"
        else:
            shutil.rmtree(folder)
            action = "rebuilt"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**identity, "complete": False}))
    count = 0
    for shard in shards:
        count = build(with_thumbnails(Path(shard), Path(work)), NAME, settings, progress=progress).count
    marker.write_text(json.dumps({**identity, "complete": True}))
    return Seeded(folder, count, action)
