"""The `hqclip` command, on top of everything: training, the offline jobs and the gateway.

Each subcommand imports its module lazily, so a serve-only install (`pip install 'hqclip[serve]'`, the gateway
image) runs `hqclip serve`, and a command whose extra is missing says in one line what to install.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="HQ-CLIP: train, export, refine and serve.")


@contextmanager
def _needs(extra: str, command: str) -> Iterator[None]:
    """The imports inside need ``hqclip[extra]``: without it, one line naming the extra instead of a traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        typer.echo(f"error: `hqclip {command}` needs the {extra!r} extra ({exc.name} is not installed): "
                   f"pip install 'hqclip[{extra}]'", err=True)
        raise typer.Exit(2) from None


@app.callback()
def main() -> None:
    """HQ-CLIP: train, export, refine and serve."""


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default HQCLIP_HOST or 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default HQCLIP_PORT or 8000)."),
) -> None:
    """Start the HTTP gateway on the model repository (HQCLIP_MODEL_REPO)."""
    with _needs("serve", "serve"):
        import uvicorn

        from services.app import create_app
        from services.settings import Settings

    settings = Settings()
    if host:
        settings.host = host
    if port:
        settings.port = port
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


@app.command()
def export(
    model: str = typer.Argument(None, help="open_clip model name (ViT-B-16), a checkpoint folder "
                                "(open_clip_config.json + open_clip_model.safetensors) or hf-hub:org/repo. "
                                "Leave it out to add --precision variants to a model already in --out."),
    pretrained: str = typer.Option(None, "--pretrained", help="Weights for a model name: a checkpoint file "
                                   "or an open_clip tag. Without any, the weights are random."),
    name: str = typer.Option(None, help="Model name in the repository (default: derived from MODEL)."),
    out: Path = typer.Option(Path("model_repo"), help="The Triton model repository to write into."),
    max_batch_size: int = typer.Option(32, min=1, help="Largest batch the towers take (Triton max_batch_size)."),
    opset: int = typer.Option(17, min=14, help="ONNX opset."),
    triton_device: str = typer.Option("auto", help="Where Triton runs each model: auto (GPUs when it sees any), "
                                      "gpu or cpu (config.pbtxt instance_group)."),
    triton_instances: int = typer.Option(1, min=1, help="Model instances per GPU (or on the CPU)."),
    preferred_batch_sizes: str = typer.Option("", help="Triton dynamic batcher's preferred sizes, e.g. '16,32' "
                                              "(default: half the max batch size, and the max)."),
    max_queue_delay_us: int = typer.Option(500, min=0, help="How long Triton waits to fill a preferred batch."),
    tensorrt: str = typer.Option("none", help="none; accelerator (ONNX Runtime's TensorRT provider in Triton); "
                                 "plan (TensorRT engines built by trtexec: docker compose --profile tensorrt)."),
    tensorrt_precision: str = typer.Option("fp16", help="TensorRT precision: fp16 or fp32."),
    precision: list[str] = typer.Option(None, help="fp32 (always, with MODEL), bf16, int8; repeatable. Variants are "
                                        "built from the fp32 towers and kept only at parity (docs/precision.md)."),
    eval_data: Path = typer.Option(Path("build/demo/data"), help="Parity photos and texts for --precision: the "
                                   "demo's held-out shards; where missing, an offline set (docs/precision.md)."),
    force: bool = typer.Option(False, "--force", help="Build a --precision this CPU only emulates (bf16 without "
                               "AVX512-BF16/AMX), gating it on 32 images; without it such an export is refused."),
    version: str = typer.Option(None, help="Install as this Triton version beside the versions in --out: a number, "
                                "or 'next' (one past the newest); a gateway then reloads it without a restart. "
                                "Default: replace the model with version 1."),
    keep_versions: int = typer.Option(2, min=1, help="With --version: versions kept (older ones deleted once "
                                      "the manifest names the new one)."),
) -> None:
    """Export an open_clip model to the model repository: ONNX towers, config.pbtxt, tokenizer, manifest."""
    with _needs("train", "export"):
        from hqclip.jobs.precision import (
            EmulatedPrecision,
            GateFailed,
            check_native,
            export_precision,
            requested_variants,
        )
        from hqclip.repo.triton_config import TritonOptions
        from training.export import export_checkpoint

    if version not in (None, "next") and not (version.isdigit() and int(version) >= 1):
        raise typer.BadParameter(f"a positive number or 'next', not {version!r}", param_hint="--version")
    try:
        variants = requested_variants(precision or [], with_model=bool(model))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--precision") from None
    try:  # said before anything starts, not after the fp32 export
        for variant in variants:
            check_native(variant, force)
    except EmulatedPrecision as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if model:
        triton = TritonOptions(
            device=triton_device, instances=triton_instances, max_queue_delay_us=max_queue_delay_us,
            preferred_batch_sizes=tuple(int(s) for s in preferred_batch_sizes.split(",") if s.strip()),
            tensorrt=tensorrt, tensorrt_precision=tensorrt_precision)
        name = export_checkpoint(model, pretrained, out=out, name=name, max_batch_size=max_batch_size, opset=opset,
                                 triton=triton, version=version,
                                 keep_versions=keep_versions).name.removesuffix(".manifest.json")
    failed = False
    for variant in variants:  # each variant passes or fails on its own; any failure makes the exit status 1
        try:
            export_precision(out, variant, name=name, data=eval_data, force=force)
        except GateFailed as exc:
            typer.echo(f"error: {exc}", err=True)
            failed = True
    if failed:
        raise typer.Exit(1)


@app.command()
def train(
    config: Path = typer.Option(None, "--config", help="YAML config (sections model, data, loss, optim, run)."),
    overrides: list[str] = typer.Argument(None, help="section.field=value overrides, e.g. optim.lr=1e-4"),
) -> None:
    """Train with the HQ-CLIP objective (resumes from the output folder); under torchrun for data parallel."""
    with _needs("train", "train"):
        from training.train import main as train_main

    train_main((["--config", str(config)] if config else []) + list(overrides or []))


# The offline jobs' distributor options (refine, embed, index build): hqclip/jobs/distribute.py, docs/scale.md.
_RAY = typer.Option(None, "--ray/--no-ray", help="Run on Ray (default: when installed) or in this process.")
_RAY_ADDRESS = typer.Option(None, help="Join a Ray cluster: auto (`ray start` here) or ray://HOST:10001. "
                            "Default: start a local Ray.")


@app.command()
def refine(
    sources: list[Path] = typer.Argument(..., help="Webdataset .tar shards or folders of them (img2dataset output), "
                                         "or one folder of images."),
    out: Path = typer.Option(..., help="Folder for the refined shards, failures.jsonl and the resume state."),
    url: list[str] = typer.Option(None, help="LVLM server (http://HOST:8000/v1); repeatable. "
                                  "Default: HQCLIP_REFINE__URLS."),
    concurrency: int = typer.Option(None, min=1, help="Requests in flight (default HQCLIP_REFINE__CONCURRENCY)."),
    captions: Path = typer.Option(None, help="With a folder of images: a CSV with the image path and alt text."),
    image_column: str = typer.Option("image", help="The CSV's image path column (relative to the folder)."),
    caption_column: str = typer.Option("caption", help="The CSV's alt text column."),
    shard_size: int = typer.Option(10_000, min=1, help="Samples per output shard, with a folder of images."),
    worker_index: int = typer.Option(0, min=0, help="This job's part of the shards, for SLURM array jobs "
                                      "($SLURM_ARRAY_TASK_ID; see --worker-count). Ray needs no split."),
    worker_count: int = typer.Option(1, min=1, help="Parts the shards are split into ($SLURM_ARRAY_TASK_COUNT)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    ray: bool = _RAY,
    ray_address: str = _RAY_ADDRESS,
    actors: int = typer.Option(None, min=1, help="On Ray: async actors sharing --concurrency (default: one per "
                               "LVLM server)."),
    actor_cpus: float = typer.Option(0.25, min=0.01, help="On Ray: CPUs each actor reserves (it mostly waits)."),
    retries: int = typer.Option(1, min=0, help="On Ray: retries of a shard left incomplete before it is reported."),
) -> None:
    """Refine images + alt texts with an LVLM into training shards (desc, neg_desc, tags, neg_tags); resumable.
    --concurrency is the requests in flight over all servers: servers x what one vLLM replica takes."""
    with _needs("serve", "refine"):
        from hqclip.jobs.refine import refine_dataset, summary_text
        from services.settings import Settings

    use_ray = _ray_wanted(ray, ray_address, "refine")
    settings = Settings().refine
    settings.urls = url or settings.urls
    settings.concurrency = concurrency or settings.concurrency
    try:
        summary = refine_dataset(sources, out, settings, captions=captions, shard_size=shard_size,
                                 image_column=image_column, caption_column=caption_column,
                                 worker_index=worker_index, worker_count=worker_count, progress=progress,
                                 use_ray=use_ray, ray_address=ray_address, actors=actors or max(len(settings.urls), 1),
                                 actor_cpus=actor_cpus, retries=retries)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary_text(summary, out))
    _scale_hint(use_ray)
    raise typer.Exit(0 if summary.complete else 1)


@app.command()
def embed(
    sources: list[Path] = typer.Argument(..., help="Webdataset .tar shards or folders of them."),
    out: Path = typer.Option(..., help="Folder for the embedding shards, <shard>.npz each (keys, ids, embeddings, "
                             "items); a rerun skips those written."),
    batch_size: int = typer.Option(64, min=1, help="Images sent to the engine at once."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    ray: bool = _RAY,
    ray_address: str = _RAY_ADDRESS,
    actors: int = typer.Option(1, min=1, help="On Ray: actors, each holding one engine (HQCLIP_BACKEND)."),
    actor_cpus: float = typer.Option(1.0, min=0.01, help="On Ray: CPUs each actor reserves."),
    actor_gpus: float = typer.Option(0.0, min=0.0, help="On Ray: GPUs each actor reserves (1 with a CUDA backend)."),
    retries: int = typer.Option(1, min=0, help="Retries of a failing shard before it is reported."),
) -> None:
    """Image embeddings of webdataset shards through the model repository (HQCLIP_MODEL_REPO), one .npz per shard
    joinable by key; `hqclip index build OUT NAME` loads them into a collection."""
    with _needs("serve", "embed"):
        from hqclip.jobs.embed import embed_dataset
        from services.settings import Settings

    use_ray = _ray_wanted(ray, ray_address, "embed")
    try:
        tally = embed_dataset(sources, out, Settings(), batch_size=batch_size, use_ray=use_ray,
                              ray_address=ray_address, actors=actors, actor_cpus=actor_cpus, actor_gpus=actor_gpus,
                              retries=retries, progress=progress)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo("\n".join(tally.lines("images", "images")))
    _scale_hint(use_ray)
    raise typer.Exit(1 if tally.failed else 0)


def _ray_wanted(flag: bool | None, address: str | None, command: str) -> bool:
    """--ray/--no-ray and --ray-address: Ray when asked for or installed; asked for but missing, one line."""
    from hqclip.jobs.distribute import ray_installed

    if flag is False:
        if address:
            raise typer.BadParameter("--no-ray with --ray-address: pick one", param_hint="--ray-address")
        return False
    if flag is None and not address:
        return ray_installed()
    if not ray_installed():
        typer.echo(f"error: `hqclip {command}` on Ray needs the 'ray' extra: pip install 'hqclip[ray]'", err=True)
        raise typer.Exit(2)
    return True


def _scale_hint(used_ray: bool) -> None:
    from hqclip.jobs.distribute import SCALE_HINT, ray_installed

    if not used_ray and not ray_installed():
        typer.echo(f"ran in one process; {SCALE_HINT}", err=True)


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Option(None, help="An `hqclip train` checkpoint (model, tag head, vocabulary)."),
    model: str = typer.Option(None, help="Or: an open_clip model name or checkpoint folder."),
    pretrained: str = typer.Option(None, help="Weights for --model: a file or an open_clip tag."),
    shards: list[str] = typer.Option(None, help="Webdataset shards (brace patterns expand); repeatable."),
    folder: Path = typer.Option(None, help="Or: a folder of labelled images, <folder>/<class name>/*.jpg."),
    templates: Path = typer.Option(None, help="Zero-shot prompt templates, one per line with {} for the class."),
    out: Path = typer.Option(None, help="Write <out>.json and <out>.md."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(64, min=1),
) -> None:
    """Zero-shot accuracy, retrieval R@1/5/10, hard-negative accuracy and tag mAP, as a markdown table."""
    with _needs("train", "eval"):
        from training.evaluate import run, to_markdown

    results = run(checkpoint=checkpoint, model=model, pretrained=pretrained, shards=shards or None, folder=folder,
                  templates_file=templates, out=out, device=device, batch_size=batch_size)
    typer.echo(to_markdown(results, f"Evaluation of {checkpoint or model}"))


@app.command()
def join(
    shards: list[str] = typer.Argument(..., help="img2dataset shards (brace patterns expand)."),
    annotations: Path = typer.Option(..., help="Folder of released annotation files, one {uid}.json each."),
    out: Path = typer.Option(..., help="Folder for the joined shards (same file names)."),
    uid_field: str = typer.Option("uid", help="The JSON field holding the DataComp uid."),
) -> None:
    """Attach released VLM-150M/VLM-1B annotations to img2dataset shards by uid; resumable."""
    import json

    from hqclip.jobs.join import join_annotations

    typer.echo(json.dumps(join_annotations(shards, annotations, out, uid_field), sort_keys=True))


@app.command()
def reindex(
    name: str = typer.Argument(..., help="The alias whose collection was embedded by a previous model (or a "
                               "collection: it becomes an alias of its re-embedded copy)."),
    gateway: str = typer.Option(..., help="The gateway's URL, serving the new model (e.g. http://127.0.0.1:8000)."),
    api_key: str = typer.Option(None, envvar="HQCLIP_API_KEY", help="Bearer key; an admin key where "
                                "HQCLIP_ADMIN_KEYS is set (the alias flip needs one)."),
    keep_old: bool = typer.Option(False, "--keep-old", help="Keep the old collection after the flip."),
    drop_vectors: bool = typer.Option(False, "--drop-vectors", help="Flip even though items added by vector "
                                      "(nothing to embed again) are left out."),
    batch_size: int = typer.Option(32, min=1, help="Items posted to the gateway at once."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Re-embed a collection with the model the gateway serves now into NAME.<fingerprint>, then flip the alias
    NAME to it and delete the old one; a rerun resumes (docs/reindex.md)."""
    with _needs("serve", "reindex"):
        from hqclip.jobs.reindex import ReindexError
        from hqclip.jobs.reindex import reindex as run

    try:
        summary = run(gateway, name, api_key=api_key, keep_old=keep_old, progress=progress,
                      drop_vectors=drop_vectors, batch_size=batch_size)
    except ReindexError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(summary))
    raise typer.Exit(0 if summary.complete else 1)


@app.command()
def loop(
    config: Path = typer.Option(..., "--config", help="loop.yaml: work, data, train, gate, serve (docs/loop.md)."),
    stop_after: str = typer.Option(None, help="Stop after this step (refine, train, gate, export, reload), e.g. "
                                   "to look at the new model before the gate; a rerun goes on from there."),
    progress: bool = typer.Option(True, help="Show each step's progress bars."),
) -> None:
    """One round of the loop: refine new raw shards with the LVLM -> train from the served model's checkpoint ->
    gate it on a held-out set -> export the next version -> reload the gateway -> reindex collections; resumable."""
    from pydantic import ValidationError

    with _needs("serve", "loop"):
        from hqclip.jobs.loop import STEPS, GateRefused, Loop, LoopError, load_loop_config

    if stop_after not in (None, *STEPS):
        raise typer.BadParameter(f"one of {', '.join(STEPS)}", param_hint="--stop-after")
    try:
        settings = load_loop_config(config)
    except (ValidationError, ValueError, OSError) as exc:
        typer.echo(f"error: {config}: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        summary = Loop(settings, progress=progress).run(stop_after)
    except GateRefused as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(3) from None
    except LoopError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(summary)


demo_app = typer.Typer(no_args_is_help=True, help="The offline demo model (no downloads: Debian packages + wheels).")
app.add_typer(demo_app, name="demo")


@demo_app.command("build", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo_build(
    out: Path = typer.Option(Path("model_repo"), help="The model repository to export `demo` into."),
    work: Path = typer.Option(Path("build/demo"), help="Data, tower features (resumable steps)."),
    retrain: bool = typer.Option(False, help="Train the heads again instead of using training/demo/weights/."),
    collection: bool = typer.Option(True, help="Seed the `demo` collection under HQCLIP_INDEX__DIR with the "
                                    "held-out images, their captions and tags (kept when up to date)."),
    overrides: list[str] = typer.Argument(None, help="Training overrides (with --retrain), e.g. optim.steps=500"),
) -> None:
    """Build the demo model: data -> tower features -> train heads (HQ-CLIP objective) -> export; then the `demo`
    collection of its held-out images, so the gateway has something to search on its first start."""
    with _needs("train", "demo build"):
        from training.demo.build import build, build_data
        from training.demo.data import shard_paths
    with _needs("serve", "demo build"):
        from hqclip.jobs.demo_collection import seed
        from services.index.collection import CollectionBusy
        from services.settings import Settings

    steps = Steps(3 if collection else 1)
    with steps("the model: heads, towers, export into " + str(out)):
        manifest = build(out=out, work=work, retrain=retrain, overrides=overrides or [])
    typer.echo(manifest)
    if not collection:
        return
    with steps("the held-out images"):
        data = build_data(work)
    with steps("the `demo` collection"):
        try:
            seeded = seed(shard_paths(data, "heldout"), Settings(model_repo=out, model="demo"), work / "collection")
        except CollectionBusy as exc:
            typer.echo(f"error: {exc} (a gateway serves it): stop the gateway and run `hqclip demo build` again",
                       err=True)
            raise typer.Exit(1) from None
    typer.echo(seeded)


class Steps:
    """Numbered steps on stderr, each with the time it took: ``with steps("what"): ...``."""

    def __init__(self, total: int) -> None:
        from rich.console import Console

        self.total, self.done, self.console = total, 0, Console(stderr=True)

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        import time

        self.done += 1
        self.console.print(f"[bold]demo build {self.done}/{self.total}[/bold] {what}")
        started = time.monotonic()
        yield
        self.console.print(f"[bold]demo build {self.done}/{self.total}[/bold] done in "
                           f"{time.monotonic() - started:.0f} s")


index_app = typer.Typer(no_args_is_help=True, help="Retrieval collections (docs/retrieval.md).")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    source: Path = typer.Argument(..., help="A folder of images (recursive) or of webdataset .tar shards, or a .tar."),
    name: str = typer.Argument(..., help="The collection, created under HQCLIP_INDEX__DIR (a rerun resumes it)."),
    kind: str = typer.Option("auto", help="flat, hnsw, ivfpq, or auto: ivfpq from 100,000 images up, else flat."),
    batch_size: int = typer.Option(64, min=1, help="Images embedded and stored per step."),
    snapshot_every: int = typer.Option(20_000, min=1, help="Items between snapshots."),
    ray: bool = _RAY,
    ray_address: str = _RAY_ADDRESS,
    embeddings: Path = typer.Option(None, help="On Ray: where the embedding shards go (default: SOURCE.embeddings "
                                    "beside the shards); a rerun reuses them."),
    actors: int = typer.Option(1, min=1, help="On Ray: embedding actors (`hqclip embed --help`)."),
    actor_cpus: float = typer.Option(1.0, min=0.01, help="On Ray: CPUs per embedding actor."),
    actor_gpus: float = typer.Option(0.0, min=0.0, help="On Ray: GPUs per embedding actor."),
) -> None:
    """Embed images through the model repository (HQCLIP_MODEL_REPO) into a collection the gateway loads at start;
    SOURCE may also be a folder of embedding shards (`hqclip embed`). Stop the gateway serving HQCLIP_INDEX__DIR
    first, or build into another folder."""
    import dataclasses
    import json

    with _needs("serve", "index build"):
        from hqclip.jobs.embed import build_from_embeddings, embed_dataset, embedding_shards
        from hqclip.jobs.index_build import build
        from services.settings import Settings

    if kind not in ("auto", "flat", "hnsw", "ivfpq"):
        raise typer.BadParameter("kind must be auto, flat, hnsw or ivfpq", param_hint="--kind")
    settings = Settings()
    shards = (source.is_dir() and any(source.glob("*.tar"))) or source.suffix == ".tar"
    use_ray = shards and _ray_wanted(ray, ray_address, "index build")
    if use_ray:  # the embedding on Ray, the collection's writes here (one writer)
        embeddings = embeddings or source.with_name(source.name + ".embeddings")
        tally = embed_dataset([source], embeddings, settings, batch_size=batch_size, use_ray=True,
                              ray_address=ray_address, actors=actors, actor_cpus=actor_cpus, actor_gpus=actor_gpus)
        typer.echo("\n".join(tally.lines("images", "images")), err=True)
        if tally.failed:
            raise typer.Exit(1)
        source = embeddings
    if source.is_dir() and embedding_shards(source):
        summary = build_from_embeddings(source, name, settings, kind, snapshot_every)
    else:
        summary = build(source, name, settings, kind, batch_size, snapshot_every)
    typer.echo(json.dumps(dataclasses.asdict(summary)))
    _scale_hint(use_ray or not shards)

if __name__ == "__main__":
    app()
