"""`hqclip refine`: images with alt texts in, training shards with the four LVLM fields out (how VLM-150M was made).

Shaped like clip-retrieval's inference job, one piece per step:

- reader: :class:`Shard` lists from webdataset tars (img2dataset output: ``{key}.jpg|png|webp`` + ``.json``/``.txt``)
  or from a folder of images with a CSV of alt texts, cut into shards of ``shard_size``;
  ``worker_index/worker_count`` keep every n-th shard: for SLURM array jobs, one array task per part
  (``--worker-index $SLURM_ARRAY_TASK_ID --worker-count $SLURM_ARRAY_TASK_COUNT``); a Ray cluster needs no split.
- mapper: one sample -> :class:`RefineClient` -> the four fields.
- state: :class:`State`, SQLite: each refined sample is committed as it lands; a rerun skips those.
- writer: once every sample of a shard has its answer, the output shard is written whole (temporary file, fsync,
  rename) next to nothing else of its name, and the shard's rows leave the state. A written shard is never touched
  again, so no sample is ever written twice, whatever the crash.
- runner: :func:`run`, ``concurrency`` samples in flight, a progress bar with rate and ETA, a failure log
  (``failures.jsonl``) and a :class:`Summary`.
- distributor: in this process (all shards through one :func:`run`), or on Ray (hqclip/jobs/distribute.py): one
  actor call per shard, each actor an async client with ``concurrency / actors`` requests in flight, :func:`run`
  on that one shard with the shard's own state file (``.refine-state/<shard>.sqlite``, so actors on several
  machines never share a database); a shard left incomplete is retried, then reported by name.

Output samples keep every member of the input sample; the JSON gains ``desc``, ``neg_desc``, ``tags``, ``neg_tags``
and keeps the alt text under ``caption``: the format ``hqclip train`` reads.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from hqclip.jobs.distribute import distribute, tar_shards
from hqclip.shards import Sample, image_files, json_member, read_tar, sample, write_tar
from services.refine.client import RefineClient, RefineFailed, RefineRejected, RefinerUnavailable
from services.refine.prompt import image_mime

FAILURE_LOG = "failures.jsonl"
SHARDS_PER_ACTOR = 2  # on Ray: while one shard's last answers land, the next shard's requests already flow


# --- reader ---
@dataclass
class Shard:
    name: str  # the output file name
    read: Callable[[], Iterator[Sample]]


def folder_shards(images: Path, captions: Path | None, shard_size: int, image_column: str = "image",
                  caption_column: str = "caption") -> list[Shard]:
    """A folder of images (+ a CSV with an image path column and an alt text column) as shards of ``shard_size``.

    Keys are the 9-digit position in the CSV (or in the sorted folder); the JSON names the file under ``file``.
    """
    if captions is not None:
        with open(captions, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {image_column, caption_column} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{captions} has no column {', '.join(sorted(missing))}; its columns are "
                                 f"{reader.fieldnames}: pass --image-column/--caption-column")
            rows = [(row[image_column], row[caption_column]) for row in reader]
    else:
        files = image_files(images)
        rows = [(str(p.relative_to(images)), None) for p in files]

    def read(start: int) -> Iterator[Sample]:
        for index, (file, caption) in enumerate(rows[start:start + shard_size], start):
            ext = Path(file).suffix.lower().lstrip(".") or "jpg"
            meta = {"file": file} if caption is None else {"file": file, "caption": caption}
            try:
                members = {ext: (images / file).read_bytes()}
            except OSError:
                members = {}
            yield sample(f"{index:09d}", members, meta)

    return [Shard(f"{i // shard_size:05d}.tar", lambda i=i: read(i)) for i in range(0, len(rows), shard_size)]


def my_shards(shards: list[Shard], worker_index: int, worker_count: int) -> list[Shard]:
    """This worker's part: every ``worker_count``-th shard from ``worker_index``."""
    if not 0 <= worker_index < worker_count:
        raise ValueError(f"--worker-index must be in [0, {worker_count}), got {worker_index}")
    return shards[worker_index::worker_count]


# --- state ---
class State:
    """Refined samples of unfinished shards, and samples that cannot be refined, in SQLite (WAL)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS refined (shard TEXT, key TEXT, fields TEXT NOT NULL, "
                        "PRIMARY KEY (shard, key))")
        self.db.execute("CREATE TABLE IF NOT EXISTS rejected (shard TEXT, key TEXT, error TEXT NOT NULL, "
                        "PRIMARY KEY (shard, key))")

    def done(self, shard: str) -> set[str]:
        rows = self.db.execute("SELECT key FROM refined WHERE shard = ? UNION SELECT key FROM rejected "
                               "WHERE shard = ?", (shard, shard))
        return {key for (key,) in rows}

    def add(self, shard: str, key: str, fields: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO refined VALUES (?, ?, ?)", (shard, key, json.dumps(fields)))

    def reject(self, shard: str, key: str, error: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO rejected VALUES (?, ?, ?)", (shard, key, error))

    def fields(self, shard: str) -> dict[str, dict]:
        rows = self.db.execute("SELECT key, fields FROM refined WHERE shard = ?", (shard,))
        return {key: json.loads(fields) for key, fields in rows}

    def forget(self, shard: str) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM refined WHERE shard = ?", (shard,))
            self.db.execute("DELETE FROM rejected WHERE shard = ?", (shard,))

    def close(self) -> None:
        self.db.close()


# --- writer ---
def write_shard(shard: Shard, fields: dict[str, dict], out: Path) -> int:
    """The output shard, written whole: refined samples with their four fields; the rest left out."""
    def refined() -> Iterator[tuple[str, dict[str, bytes]]]:
        written: set[str] = set()
        for item in shard.read():
            if item.key not in fields or item.key in written:
                continue
            meta = {**item.meta, "key": item.key, "caption": item.caption or "", **fields[item.key]}
            written.add(item.key)
            yield item.key, {**item.members, "json": json_member(meta)}

    return write_tar(out, refined())


# --- runner ---
@dataclass
class Summary:
    shards: int = 0  # this worker's shards
    shards_written: int = 0
    shards_already_written: int = 0
    refined: int = 0  # samples refined in this run
    already_refined: int = 0  # samples a previous run refined (not sent again)
    rejected: int = 0  # samples left out for good (not an image, refused by the server)
    unfinished: int = 0  # samples that failed this time and will be retried by a rerun
    stopped: str | None = None  # why the run stopped early
    seconds: float = 0.0
    failed_shards: dict[str, str] = field(default_factory=dict)  # on Ray: shard -> why, after its retries

    @property
    def complete(self) -> bool:
        return self.stopped is None and self.unfinished == 0 and not self.failed_shards


class _Progress:
    """A rich progress bar over samples, with the rate of this run's refinements and an ETA from it."""

    def __init__(self, shards: int, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.shards, self.read_shards, self.read_samples = shards, 0, 0
        self.started, self.refined = time.monotonic(), 0
        self.bar = Progress(TextColumn("refine"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} {task.fields[eta]}"), disable=not enabled)
        self.task = self.bar.add_task("refine", total=None, rate="", eta="")

    def shard_read(self, samples: int) -> None:
        """Totals are known shard by shard: estimate the rest from the shards read so far."""
        self.read_shards += 1
        self.read_samples += samples
        estimate = self.read_samples + self.read_samples / self.read_shards * (self.shards - self.read_shards)
        self.bar.update(self.task, total=round(estimate))

    def advance(self, refined: bool) -> None:
        self.refined += refined
        rate = self.refined / max(time.monotonic() - self.started, 1e-9)
        task = self.bar.tasks[0]
        left = (task.total - task.completed - 1) / rate if task.total and rate else None
        eta = f"ETA {time.strftime('%H:%M:%S', time.gmtime(left))}" if left is not None else ""
        self.bar.update(self.task, advance=1, rate=f"{rate:.2f} img/s", eta=eta)


async def run(shards: list[Shard], client: RefineClient, out_dir: Path, state_path: Path,
              concurrency: int, progress: bool = True) -> Summary:
    """Refine every sample of ``shards`` not refined yet and write each shard once all its samples have answers."""
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before any request is in flight)
    state, summary = State(state_path), Summary(shards=len(shards))
    written = [shard for shard in shards if (out_dir / shard.name).exists()]
    pending = [shard for shard in shards if shard not in written]
    summary.shards_already_written = len(written)
    for shard in written:  # rows left by a crash between writing a shard and forgetting them
        state.forget(shard.name)
    started, slots, bar = time.monotonic(), asyncio.Semaphore(concurrency), _Progress(len(pending), progress)
    failure_log = open(out_dir / FAILURE_LOG, "a", encoding="utf-8")  # noqa: ASYNC230, SIM115 (closed in finally)
    stop = asyncio.Event()

    def log_failure(shard: Shard, sample: Sample, error: str, retried: bool) -> None:
        failure_log.write(json.dumps({"shard": shard.name, "key": sample.key, "error": error,
                                      "retried_by_rerun": retried}) + "\n")
        failure_log.flush()

    async def refine_one(shard: Shard, sample: Sample) -> bool:
        """The mapper: True when the sample has its final answer (refined or rejected for good)."""
        try:
            if sample.image is None:
                raise ValueError("the sample has no image (jpg, png or webp)")
            image_mime(sample.image)
            result = await client.refine(sample.image, sample.caption)
        except (ValueError, RefineRejected) as exc:
            state.reject(shard.name, sample.key, str(exc))
            log_failure(shard, sample, str(exc), retried=False)
            summary.rejected += 1
            bar.advance(refined=False)
            return True
        except RefineFailed as exc:
            log_failure(shard, sample, str(exc), retried=True)
            summary.unfinished += 1
            bar.advance(refined=False)
            return False
        except RefinerUnavailable as exc:
            summary.stopped = summary.stopped or str(exc)
            stop.set()
            return False
        finally:
            slots.release()
        state.add(shard.name, sample.key, result.refinement.model_dump())
        summary.refined += 1
        bar.advance(refined=True)
        return True

    async def finish(shard: Shard, tasks: list[asyncio.Task]) -> None:
        """The writer's turn: once every sample of the shard has its final answer."""
        if not all(await asyncio.gather(*tasks)):
            return
        fields = state.fields(shard.name)
        await asyncio.to_thread(write_shard, shard, fields, out_dir / shard.name)
        state.forget(shard.name)
        summary.shards_written += 1

    finishers = []
    try:
        with bar.bar:
            for shard in pending:
                if stop.is_set():
                    break
                done, tasks, count = state.done(shard.name), [], 0
                for sample in shard.read():
                    count += 1
                    if sample.key in done:
                        summary.already_refined += 1
                        bar.advance(refined=False)
                        continue
                    await slots.acquire()
                    if stop.is_set():
                        slots.release()
                        break
                    tasks.append(asyncio.create_task(refine_one(shard, sample)))
                else:  # every sample of the shard is on its way: the shard can be written when they land
                    bar.shard_read(count)
                    finishers.append(asyncio.create_task(finish(shard, tasks)))
                    continue
                finishers.append(asyncio.gather(*tasks))  # stopped part-way: let what is in flight land
            await asyncio.gather(*finishers)
    finally:
        failure_log.close()
        state.close()
    summary.seconds = time.monotonic() - started
    return summary


def summary_text(summary: Summary, out_dir: Path) -> str:
    rate = summary.refined / summary.seconds if summary.seconds else 0.0
    lines = [
        f"shards: {summary.shards_written} written now, {summary.shards_already_written} already written, "
        f"{summary.shards} in this worker's part",
        f"samples: {summary.refined} refined now ({rate:.2f}/s over {summary.seconds:.0f}s), "
        f"{summary.already_refined} refined before, {summary.rejected} left out (see {out_dir / FAILURE_LOG})",
    ]
    if summary.unfinished:
        lines.append(f"{summary.unfinished} samples failed this time: rerun the same command to retry them")
    if summary.stopped:
        lines.append(f"stopped: {summary.stopped}; progress is kept, rerun the same command to go on")
    for shard, error in sorted(summary.failed_shards.items()):
        lines.append(f"failed shard: {shard}: {error}")
    if summary.failed_shards:
        lines.append(f"{len(summary.failed_shards)} shards failed after their retries: rerun the same command to "
                     "retry them (their refined samples are kept)")
    return "\n".join(lines)


def shards_of(sources: list[Path], captions: Path | None, shard_size: int, image_column: str,
              caption_column: str) -> list[Shard]:
    """The reader for what the user named: tar files, folders of tars, or one folder of images."""
    if len(sources) == 1 and sources[0].is_dir() and not any(sources[0].glob("*.tar")):
        return folder_shards(sources[0], captions, shard_size, image_column, caption_column)
    return [Shard(path.name, lambda path=path: read_tar(path)) for path in tar_shards(sources)]


class ShardIncomplete(RuntimeError):
    """A shard some of whose samples got no final answer this time (the distributor retries it)."""


@dataclass
class RefineWork:
    """The job as the distributor sees it (picklable): each actor opens its own client and event loop."""

    sources: list[Path]
    out_dir: Path
    settings: object  # services.settings.RefineSettings; ``concurrency`` is this actor's share
    captions: Path | None = None
    shard_size: int = 10_000
    image_column: str = "image"
    caption_column: str = "caption"

    def shards(self) -> list[Shard]:
        return shards_of(self.sources, self.captions, self.shard_size, self.image_column, self.caption_column)

    async def open(self) -> Callable[[str], Awaitable[dict]]:
        shards = {shard.name: shard for shard in self.shards()}
        self.client = client = RefineClient.from_settings(self.settings)  # kept by the actor, connections too

        async def refine_shard(name: str) -> dict:
            state = self.out_dir / ".refine-state" / f"{name}.sqlite"
            summary = await run([shards[name]], client, self.out_dir, state, self.settings.concurrency,
                                progress=False)
            if summary.stopped:
                raise ShardIncomplete(summary.stopped)
            if summary.unfinished:
                raise ShardIncomplete(f"{summary.unfinished} samples got no usable answer (see {FAILURE_LOG})")
            return {"refined": summary.refined, "already_refined": summary.already_refined,
                    "rejected": summary.rejected, "shards_written": summary.shards_written,
                    "shards_already_written": summary.shards_already_written}

        return refine_shard

    async def close(self) -> None:
        await self.client.aclose()


def refine_on_ray(shards: list[Shard], work: RefineWork, *, address: str | None, actors: int, actor_cpus: float,
                  retries: int, progress: bool) -> Summary:
    """Every shard not written yet through one Ray actor call each; ``work.settings.concurrency`` requests in
    flight in all, shared evenly by the actors (so per LVLM server: concurrency / servers)."""
    actors = max(1, min(actors, len(shards)))
    per_actor = work.settings.model_copy(update={"concurrency": max(1, -(-work.settings.concurrency // actors))})
    work = replace(work, settings=per_actor)
    work.out_dir.mkdir(parents=True, exist_ok=True)
    tally = distribute([s.name for s in shards], lambda name: (work.out_dir / name).exists(), work, use_ray=True,
                       address=address, actors=actors, actor_cpus=actor_cpus, shards_per_actor=SHARDS_PER_ACTOR,
                       retries=retries, progress=progress, label="refine shards")
    counts = {key: int(value) for key, value in tally.counts.items()}
    return Summary(shards=len(shards), shards_written=counts.get("shards_written", 0),
                   shards_already_written=tally.skipped + counts.get("shards_already_written", 0),
                   refined=counts.get("refined", 0), already_refined=counts.get("already_refined", 0),
                   rejected=counts.get("rejected", 0), seconds=tally.seconds, failed_shards=tally.failed)


def refine_dataset(sources: list[Path], out_dir: Path, settings, *, captions: Path | None = None,
                   shard_size: int = 10_000, image_column: str = "image", caption_column: str = "caption",
                   worker_index: int = 0, worker_count: int = 1, progress: bool = True, use_ray: bool = False,
                   ray_address: str | None = None, actors: int = 1, actor_cpus: float = 0.25,
                   retries: int = 1) -> Summary:
    """The whole job for one worker; ``settings`` is a services.settings.RefineSettings. With ``use_ray``, on a
    local Ray or the cluster at ``ray_address``, ``actors`` async actors sharing ``settings.concurrency``."""
    work = RefineWork([Path(s).resolve() for s in sources], Path(out_dir).resolve(), settings,
                      captions.resolve() if captions else None, shard_size, image_column, caption_column)
    shards = my_shards(work.shards(), worker_index, worker_count)
    if use_ray:
        return refine_on_ray(shards, work, address=ray_address, actors=actors, actor_cpus=actor_cpus,
                             retries=retries, progress=progress)
    state_path = out_dir / ".refine-state" / f"worker-{worker_index}-of-{worker_count}.sqlite"

    async def go() -> Summary:
        client = RefineClient.from_settings(settings)
        try:
            return await run(shards, client, out_dir, state_path, settings.concurrency, progress)
        finally:
            await client.aclose()

    return asyncio.run(go())
