"""`hqclip reindex NAME`: a collection embedded by a previous model, embedded again by the model a gateway serves now,
into a new physical collection that the alias NAME then points at (docs/reindex.md).

Everything goes through the gateway's HTTP API, so the items are embedded by exactly the engine that serves queries
(its fingerprint is the new collection's) and the job needs no model, no torch and no access to the index:

1. NAME resolves to the old collection (an alias's target, or NAME itself: then the flip turns NAME into an alias);
   the new one is ``NAME.<fingerprint[:12]>`` with the old one's index parameters, created unless a killed run
   made it already (a rerun resumes into it).
2. A pass pages through the old collection (``GET .../items``) and posts each item again from what it kept: its
   text, its kept image bytes, or the image file its ``uri`` names (a path or file:// URI readable here); an item
   the new collection already holds, written after the old one's last write, is skipped. Items the new collection
   holds that the old one no longer does are deleted. A second pass catches up what changed during the first.
3. The alias flips (one atomic step on the gateway); items written to the old collection by requests that raced the
   flip are copied over; then the old collection is deleted (unless ``keep_old``), which unloads the previous model
   the gateway kept for it.

Items with nothing to embed again (added by ``vector``, or an image whose uri is not readable here) stop the flip
unless ``drop_vectors``: the summary names them; adding them to the new collection by hand (``vector``) also works.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

PAGE = 500  # items per listing page
SHOWN = 5  # ids named in a summary line


class ReindexError(RuntimeError):
    """The job cannot run as asked; the message says what to do."""


@dataclass
class ReindexSummary:
    name: str
    old: str
    new: str
    fingerprint: str = ""  # the served model's, which embedded ``new``
    copied: int = 0  # items embedded into the new collection
    skipped: int = 0  # already there and up to date (a resumed run)
    removed: int = 0  # deleted from the new collection: gone from the old one
    not_reembeddable: list[str] = field(default_factory=list)  # ids with no text or readable image
    dropped: bool = False  # those were left out (drop_vectors)
    flipped: bool = False
    deleted_old: bool = False
    complete: bool = False
    note: str = ""

    def __str__(self) -> str:
        lines = [f"reindex {self.name}: {self.old} -> {self.new} (model {self.fingerprint[:12]})",
                 f"  copied {self.copied}, skipped {self.skipped} already there, removed {self.removed}"]
        if self.not_reembeddable:
            ids = ", ".join(self.not_reembeddable[:SHOWN]) + (" ..." if len(self.not_reembeddable) > SHOWN else "")
            what = "left out" if self.dropped else "not copied"
            lines.append(f"  {len(self.not_reembeddable)} items {what}: added by vector or with no readable image "
                         f"({ids})")
        lines.append(f"  alias {'flipped' if self.flipped else 'NOT flipped'}; old collection "
                     f"{'deleted' if self.deleted_old else 'kept'}")
        if self.note:
            lines.append(f"  {self.note}")
        lines.append("  complete" if self.complete else "  INCOMPLETE")
        return "\n".join(lines)


class _Gateway:
    """The few calls the job makes; a non-2xx answer raises ReindexError with the gateway's message."""

    def __init__(self, url: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url
        self.client = httpx.Client(base_url=url, headers=headers, timeout=300)

    def call(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ReindexError(f"cannot reach the gateway at {self.url}: {exc}; start it or fix --gateway") from None
        if response.status_code >= 300:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise ReindexError(f"{method} {path}: {response.status_code} {message}")
        return response.json()

    def items(self, collection: str, since: float | None = None, images: bool = False) -> Iterator[dict]:
        """Every item of ``collection`` (written after ``since``), page by page; the first page's ``now`` is set
        as ``self.now``."""
        after, first = None, True
        while True:
            params = {"limit": PAGE, "images": images, **({"after": after} if after else {}),
                      **({"since": since} if since is not None else {})}
            page = self.call("GET", f"/v1/collections/{collection}/items", params=params)
            if first:
                self.now, first = page["now"], False
            yield from page["items"]
            if page["next"] is None:
                return
            after = page["next"]

    def close(self) -> None:
        self.client.close()


def _image_file(uri: str | None) -> bytes | None:
    """The bytes of the image a uri names, when it is a readable local path or file:// URI (http(s) is not
    fetched: docs/reindex.md)."""
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else uri)
    try:
        return path.read_bytes()
    except OSError:
        return None


def _payload(item: dict) -> dict | None:
    """The item as it is posted again, embedded from what it kept; None when it kept nothing to embed."""
    body = {k: item[k] for k in ("id", "uri", "caption", "tags", "attributes")}
    if item["source"] == "text" and item["text"] is not None:
        return {**body, "text": item["text"]}
    if item["source"] in ("image", None):  # an item stored before sources were kept: its uri, when it has one
        data = base64.b64decode(item["image"]) if item.get("image") else _image_file(item["uri"])
        if data is not None:
            return {**body, "image": base64.b64encode(data).decode()}
    return None


def reindex(gateway: str, name: str, *, api_key: str | None = None, keep_old: bool = False, progress: bool = True,
            drop_vectors: bool = False, batch_size: int = 32) -> ReindexSummary:
    """Re-embed the collection NAME names with the model ``gateway`` serves now and point the alias NAME at the
    result (see the module's text); a rerun after an interruption resumes. ReindexError when it cannot start."""
    api = _Gateway(gateway.rstrip("/"), api_key)
    try:
        return _run(api, name, keep_old, progress, drop_vectors, batch_size)
    finally:
        api.close()


def _run(api: _Gateway, name: str, keep_old: bool, progress: bool, drop_vectors: bool,
         batch_size: int) -> ReindexSummary:
    listing = api.call("GET", "/v1/collections")
    collections = {c["name"]: c for c in listing["data"]}
    aliased = name in listing["aliases"]
    if not aliased and name not in collections:
        raise ReindexError(f"NAME: no collection or alias '{name}' on {api.url} (GET /v1/collections lists them)")
    if not aliased and keep_old:
        raise ReindexError(f"NAME: '{name}' is a collection, not an alias: the flip makes '{name}' an alias and "
                           "deletes the collection of that name, so it cannot be kept; leave out --keep-old, or "
                           f"point an alias at '{name}' first (POST /v1/collections/<alias>/alias) and reindex that")
    old = collections[listing["aliases"][name] if aliased else name]
    served = api.call("GET", "/v1/models")["data"][0]["fingerprint"]
    summary = ReindexSummary(name, old["name"], f"{name}.{served[:12]}", served)
    if old["fingerprint"] == served:
        summary.new, summary.complete = old["name"], True
        summary.note = "already embedded by the served model: nothing to do"
        return summary
    _create(api, collections, old, summary.new, served)

    _copy_pass(api, summary, old, progress, batch_size, since=None)
    skipped = summary.skipped
    pending = _copy_pass(api, summary, old, progress, batch_size, since=None)  # what changed during the copy
    summary.skipped = skipped
    if summary.not_reembeddable and not drop_vectors:
        summary.note = (f"rerun with --drop-vectors to flip without them, or add them to '{summary.new}' with "
                        "'vector' and rerun")
        return summary
    summary.dropped = bool(summary.not_reembeddable)
    api.call("POST", f"/v1/collections/{name}/alias", json={"target": summary.new, "replace": not aliased})
    summary.flipped = True
    if aliased:  # writes that raced the flip into the old collection
        _copy_pass(api, summary, old, progress, batch_size, since=pending)
        if not keep_old:
            api.call("DELETE", f"/v1/collections/{old['name']}")
    summary.deleted_old = not keep_old
    summary.complete = True
    return summary


def _create(api: _Gateway, collections: dict[str, dict], old: dict, new: str, served: str) -> None:
    if new in collections:  # made by an earlier run: resume into it
        if collections[new]["fingerprint"] not in (served, None):
            raise ReindexError(f"collection '{new}' exists but was embedded by another model "
                               f"({collections[new]['fingerprint'][:12]}); delete it and rerun")
        return
    index = {"kind": old["kind"], **old["spec"]}
    api.call("POST", "/v1/collections", json={"name": new, "index": index, "keep_images": old["keep_images"]})


def _copy_pass(api: _Gateway, summary: ReindexSummary, old: dict, progress: bool, batch_size: int,
               since: float | None) -> float:
    """Bring the new collection up to date with the old one (its items written after ``since``; all when None,
    removing from the new collection what the old one no longer holds); the old listing's start time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    have = {item["id"]: item["updated"] or 0.0 for item in api.items(summary.new)}
    seen: set[str] = set()
    missing: set[str] = set(summary.not_reembeddable)
    batch: list[dict] = []

    def flush() -> None:
        if batch:
            api.call("POST", f"/v1/collections/{summary.new}/items", json={"items": batch, "refine": False})
            summary.copied += len(batch)
            batch.clear()

    label = "catch-up" if since is not None else "re-embed"
    columns = (TextColumn(f"[bold]{label} {old['name']}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(label, total=None if since is not None else old["count"])
        for item in api.items(old["name"], since=since, images=old["keep_images"]):
            seen.add(item["id"])
            bar.advance(task)
            if item["id"] in have and have[item["id"]] >= (item["updated"] or 0.0):
                summary.skipped += 1
                continue
            payload = _payload(item)
            if payload is None:
                if item["id"] not in have:
                    missing.add(item["id"])
                continue
            missing.discard(item["id"])
            batch.append(payload)
            if len(batch) >= batch_size:
                flush()
        flush()
    started = api.now
    if since is None:
        summary.not_reembeddable = sorted(missing & seen)
        gone = [i for i in have if i not in seen]
        for start in range(0, len(gone), PAGE):
            api.call("DELETE", f"/v1/collections/{summary.new}/items", json={"ids": gone[start : start + PAGE]})
        summary.removed += len(gone)
    return started
