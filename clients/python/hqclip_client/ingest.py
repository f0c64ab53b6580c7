"""Ingesting a folder of images into a collection: find -> read -> add in batches -> record, resumable.

Every image becomes an item whose id is its path relative to the folder (so a rerun upserts the same ids), with
its absolute path as ``uri``, the first line of a sidecar ``<name>.txt`` as caption, and a small JPEG thumbnail
(when Pillow is installed) as ``attributes.thumbnail`` for the gateway's web page. Ids the gateway acknowledged
are appended to a state file (fsynced per batch); a rerun skips them. An image the gateway refuses is taken out
of its batch with the gateway's reason and the rest of the batch is sent again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hqclip_client.client import Client
from hqclip_client.errors import BadRequestError, NotFoundError
from hqclip_client.types import Item

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
THUMBNAIL_PIXELS = 160
_ITEM_INDEX = re.compile(r"\[(\d+)\]")


@dataclass
class Summary:
    added: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # id -> reason
    total: int = 0
    state: str = ""
    count: int | None = None  # items in the collection at the end


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def default_state_path(base_url: str, collection: str, folder: Path) -> Path:
    key = hashlib.sha1(f"{base_url}|{collection}|{folder.resolve()}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hqclip-client" / f"ingest-{collection}-{key}.jsonl"


class State:
    """Acknowledged ids, one JSON string per line, appended and fsynced after each batch."""

    def __init__(self, path: Path, restart: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if restart:
            path.unlink(missing_ok=True)
        self.done: set[str] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.done.add(json.loads(line))
                except ValueError:  # a line torn by a crash mid-write: that batch is simply sent again
                    continue

    def record(self, ids: list[str]) -> None:
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(i) + "\n" for i in ids))
            f.flush()
            os.fsync(f.fileno())
        self.done.update(ids)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)
        self.done.clear()


def thumbnail(data: bytes) -> str | None:
    """A small JPEG data URI, or None without Pillow or for a file Pillow cannot read (the gateway will say why)."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            buffer = io.BytesIO()
            small.save(buffer, format="JPEG", quality=75)
    except Exception:  # any decoding failure: no thumbnail, the gateway's verdict is what counts
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _caption(path: Path) -> str | None:
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        lines = sidecar.read_text(errors="replace").strip().splitlines()
        return lines[0].strip() if lines else None
    return None


def _item(folder: Path, path: Path, thumbnails: bool, max_bytes: int) -> Item:
    """The item for one file; raises OSError / ValueError with the reason it cannot be sent."""
    item_id = path.relative_to(folder).as_posix()
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{size} bytes, more than the limit of {max_bytes}")
    if size == 0:
        raise ValueError("the file is empty")
    data = path.read_bytes()
    attributes = {}
    if thumbnails and (thumb := thumbnail(data)):
        attributes["thumbnail"] = thumb
    return Item(id=item_id, image=data, uri=str(path.resolve()), caption=_caption(path), attributes=attributes)


def ingest(client: Client, folder: Path, collection: str, *, batch_size: int = 32, state_path: Path | None = None,
           restart: bool = False, create: bool = False, index: dict | None = None, thumbnails: bool = True,
           refine: bool | None = None, max_image_bytes: int = 20 * 1024 * 1024,
           on_start: Callable[[int], None] = lambda total: None,
           on_progress: Callable[[int], None] = lambda done: None) -> Summary:
    """Add every image under ``folder`` not yet recorded; ``on_progress`` hears how many files each step settled."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    try:
        info = client.get_collection(collection)
    except NotFoundError:
        if not create:
            raise
        info = client.create_collection(collection, index=index)
    state = State(state_path or default_state_path(client.base_url, collection, folder), restart)
    if state.done and info.count == 0:  # the collection was emptied or re-created since: start over
        state.forget()
    paths = find_images(folder)
    summary = Summary(total=len(paths), state=str(state.path))
    on_start(len(paths))
    todo = []
    for path in paths:
        if path.relative_to(folder).as_posix() in state.done:
            summary.skipped += 1
        else:
            todo.append(path)
    on_progress(summary.skipped)
    batch_size = max(1, min(batch_size, client.max_items))
    for start in range(0, len(todo), batch_size):
        items = []
        for path in todo[start:start + batch_size]:
            try:
                items.append(_item(folder, path, thumbnails, max_image_bytes))
            except (OSError, ValueError) as exc:
                summary.failed[path.relative_to(folder).as_posix()] = str(exc)
                on_progress(1)
        summary.added += _add(client, collection, items, refine, state, summary, on_progress)
    summary.count = client.get_collection(collection).count
    return summary


def _add(client: Client, collection: str, items: list[Item], refine: bool | None, state: State, summary: Summary,
         on_progress: Callable[[int], None]) -> int:
    """Send one batch, dropping each item the gateway names as bad; the number added."""
    while items:
        try:
            result = client.add(collection, items, refine=refine)
        except BadRequestError as exc:
            where = _ITEM_INDEX.search(exc.param or "")
            if not where or int(where.group(1)) >= len(items):
                raise  # not about one file (e.g. a batch over the gateway's limit): stop, the state keeps what is done
            bad = items.pop(int(where.group(1)))
            # the gateway's reason, without its "items.image[2]: " (the file names the item)
            summary.failed[bad.id] = exc.message.removeprefix(f"{exc.param}: ")
            on_progress(1)
            continue
        state.record(result.ids)
        on_progress(len(items))
        return len(items)
    return 0
