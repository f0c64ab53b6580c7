"""Installing built models into a repository atomically, for `hqclip export` and the precision variants alike.

A builder writes model folders into a staging folder beside the repository (same file system, so a rename is
atomic). ``install`` moves them in, moving aside what they replace, and writes the manifest last: services read the
manifest first, so until it is replaced they see the old model whole, and after it the new one whole.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hqclip.repo.layout import manifest_path, versions
from hqclip.repo.manifest import Manifest, sha256_file


@contextmanager
def staging(repo: Path, label: str) -> Iterator[Path]:
    """A temporary folder beside ``repo`` for a build, removed afterwards whatever happens."""
    repo = Path(repo).resolve()
    repo.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{repo.name}-{label}-", dir=repo.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def install(repo: Path, stage: Path, manifest: Manifest, folders: Iterable[str],
            remove: Iterable[str] = ()) -> Manifest:
    """Move ``folders`` from ``stage`` into ``repo`` and write ``manifest`` with their checksums; returns it.

    ``folders`` are paths relative to both: whole model folders, or (a new version beside the others) a model's
    version folder and its model-level files (``<model>/2``, ``<model>/config.pbtxt``).
    ``remove``: other folders of this model that the new manifest no longer names (an old tag head, the
    precision variants of replaced towers). Whatever is replaced or removed goes to ``stage`` (deleted with it).
    The manifest's ``files`` keep their entries outside the installed and removed folders.
    """
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    folders = list(folders)
    gone = [*folders, *remove]
    trash = stage / ".replaced"
    trash.mkdir(exist_ok=True)
    files = {rel: digest for rel, digest in manifest.files.items() if not rel.startswith(tuple(f"{f}/" for f in gone))}
    for folder in gone:
        if (repo / folder).exists():
            (trash / folder).parent.mkdir(parents=True, exist_ok=True)
            (repo / folder).rename(trash / folder)
    for folder in folders:
        (repo / folder).parent.mkdir(parents=True, exist_ok=True)
        (stage / folder).rename(repo / folder)
        installed = [repo / folder] if (repo / folder).is_file() else sorted((repo / folder).rglob("*"))
        files.update({p.relative_to(repo).as_posix(): sha256_file(p) for p in installed if p.is_file()})
    installed = manifest.model_copy(update={"files": dict(sorted(files.items()))})
    target = manifest_path(repo, manifest.name)
    temporary = stage / target.name
    temporary.write_text(installed.model_dump_json(indent=2) + "\n")
    temporary.replace(target)
    return installed


def prune_versions(repo: Path, manifest: Manifest, keep: int) -> list[Path]:
    """Delete the version folders of ``manifest``'s models past the newest ``keep``, never one it names; the
    folders deleted. Call it after the manifest naming the new versions is in place: until then services may
    read the old one."""
    models = [manifest.image.model, manifest.text.model, *([manifest.tags.model] if manifest.tags else []),
              *(m for v in manifest.variants.values() for m in (v.image_model, v.text_model))]
    named = {model: manifest.version(model) for model in models}
    deleted = []
    for model, current in named.items():
        for version in versions(repo, model)[keep:]:
            if version != current:
                shutil.rmtree(Path(repo) / model / str(version))
                deleted.append(Path(repo) / model / str(version))
    return deleted

