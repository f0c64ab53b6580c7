"""`hqclip join`: the released VLM-150M/VLM-1B annotations attached to img2dataset shards by uid.

The released annotations are one ``{uid}.json`` per image (``desc``, ``neg_desc``, ``tags``, ``neg_tags``); the
images come from img2dataset, whose JSON carries the DataComp ``uid``. Each input shard becomes an output shard of
the same name holding the samples that have an annotation, their JSON extended with the four fields. Resumable: an
output shard that exists is skipped (shards are written whole, under a temporary name, then renamed).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from hqclip.shards import ANNOTATION_FIELDS, json_member, read_tar, write_tar


def expand(patterns: list[str]) -> list[str]:
    """Shard paths with brace patterns (``shards/{00000..00099}.tar``) expanded."""
    from braceexpand import braceexpand

    return [path for pattern in patterns for path in braceexpand(str(pattern))]


def annotation_lookup(root: Path) -> Callable[[str], dict | None]:
    """``uid -> annotation`` from a folder of ``{uid}.json`` files (the released VLM-150M/VLM-1B layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"annotation folder {root} does not exist: "
                                "point --annotations at the {uid}.json files")

    def lookup(uid: str) -> dict | None:
        path = root / f"{uid}.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return {name: data[name] for name in ANNOTATION_FIELDS if name in data}

    return lookup


def join_shard(path: Path, out_path: Path, lookup: Callable[[str], dict | None], uid_field: str = "uid") -> Counter:
    """Copy one shard, merging each sample's annotation into its JSON; unmatched samples are dropped, counted."""
    counts: Counter[str] = Counter()

    def joined() -> Iterator[tuple[str, dict[str, bytes]]]:
        for sample in read_tar(path):
            uid = sample.meta.get(uid_field)
            if uid is None:
                counts[f"missing:{uid_field}"] += 1
                continue
            annotation = lookup(str(uid))
            if annotation is None:
                counts["no_annotation"] += 1
                continue
            counts["joined"] += 1
            yield sample.key, {**sample.members, "json": json_member({**sample.meta, **annotation})}

    write_tar(out_path, joined())
    return counts


def join_annotations(shards: list[str], annotations: Path, out_dir: Path, uid_field: str = "uid",
                     progress: bool = True) -> Counter:
    """Join every shard (resumable: shards already written are skipped); returns the summed counts."""
    from rich.progress import track

    lookup = annotation_lookup(annotations)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total: Counter[str] = Counter()
    for path in track(expand(shards), description="join", disable=not progress):
        out_path = out_dir / Path(path).name
        if out_path.exists():
            total["shards_already_done"] += 1
            continue
        total.update(join_shard(Path(path), out_path, lookup, uid_field))
        total["shards"] += 1
    return total
