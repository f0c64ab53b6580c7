"""The ``hqclip-client`` command: embed, classify, tags, search, ingest, refine and collections, against a gateway.

Every command takes --url (HQCLIP_URL), --api-key (HQCLIP_API_KEY), --timeout and --format table|json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hqclip_client.client import Client
from hqclip_client.errors import HQClipError


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="gateway URL (default: HQCLIP_URL or http://127.0.0.1:8000)")
    common.add_argument("--api-key", default=None, help="API key (default: HQCLIP_API_KEY)")
    common.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    common.add_argument("--max-items", type=int, default=None,
                        help="inputs per request, at most the gateway's HQCLIP_LIMITS__MAX_ITEMS (default 256)")
    common.add_argument("--format", choices=("table", "json"), default="table", help="output (default table)")
    return common


def parser() -> argparse.ArgumentParser:
    common = _common()
    root = argparse.ArgumentParser(prog="hqclip-client", description="Command line of the HQ-CLIP gateway.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("embed", parents=[common], help="embed texts and images")
    p.add_argument("--text", "-t", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument("--image", "-i", action="append", default=[], type=Path, help="an image file (repeatable)")

    p = commands.add_parser("classify", parents=[common], help="zero-shot classification of images")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--labels", "-l", action="append", required=True,
                   help="class names, comma-separated or repeated: -l cat,dog -l 'coffee cup'")
    p.add_argument("--template", action="append", default=None, help="prompt template with '{}' (repeatable)")
    p.add_argument("--top-k", type=int, default=5)

    p = commands.add_parser("tags", parents=[common], help="short tags of images (the model's tag head)")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--threshold", type=float, default=0.0, help="leave out tags below this probability")

    p = commands.add_parser("search", parents=[common], help="search a collection by text, image or item id")
    p.add_argument("collection")
    p.add_argument("query", nargs="?", help="a text query")
    p.add_argument("--image", type=Path, help="query by this image instead")
    p.add_argument("--id", help="query by this stored item instead")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--tag", action="append", default=[], help="only items with this tag (repeatable)")
    p.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                   help="only items whose attribute KEY equals VALUE (a JSON value, else a string; repeatable)")
    p.add_argument("--templates", action="store_true", help="embed a text query through the prompt ensemble")

    p = commands.add_parser("ingest", parents=[common], help="add a folder of images to a collection (resumable)")
    p.add_argument("folder", type=Path)
    p.add_argument("collection")
    p.add_argument("--create", action="store_true", help="create the collection if it does not exist")
    p.add_argument("--kind", choices=("flat", "hnsw", "ivfpq"), default=None, help="index kind for --create")
    p.add_argument("--batch-size", type=int, default=32, help="images per request (default 32)")
    p.add_argument("--state", type=Path, default=None, help="state file of added ids (default: in ~/.cache)")
    p.add_argument("--restart", action="store_true", help="forget the state file and send every image again")
    p.add_argument("--no-thumbnails", action="store_true", help="do not store small thumbnails for the web page")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                   help="store the LVLM's tags and descriptions (default: when the gateway has an LVLM)")

    p = commands.add_parser("refine", parents=[common], help="the LVLM's descriptions and tags of images")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--alt-text", action="append", default=None, help="alt text, one per image in order")

    p = commands.add_parser("collections", parents=[common], help="list, show, create or delete collections")
    p.add_argument("action", choices=("list", "show", "create", "delete"), nargs="?", default="list")
    p.add_argument("name", nargs="?")
    p.add_argument("--kind", choices=("flat", "hnsw", "ivfpq"), default=None, help="index kind for create")
    return root


def _console(stderr: bool = False):
    try:
        from rich.console import Console
    except ImportError:
        sys.exit("hqclip-client needs rich for its output: pip install 'hqclip-client[cli]'")
    return Console(stderr=stderr)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title))
    for column in columns:
        table.add_column(column)
    for row in rows:  # as plain text: a caption like "[draft]" is not markup
        table.add_row(*[Text(f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row])
    _console().print(table)


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _attr(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--attr {text!r}: write KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _embed(client: Client, args: argparse.Namespace) -> None:
    if not args.text and not args.image:
        raise SystemExit("embed: give --text and/or --image")
    rows: list[tuple[str, str, list[float], bool]] = []
    if args.text:
        result = client.embed_texts(args.text)
        rows += [(t, "text", list(map(float, v)), cut)
                 for t, v, cut in zip(args.text, result.vectors, result.truncated)]
    if args.image:
        result = client.embed_images(args.image)
        rows += [(str(p), "image", list(map(float, v)), False) for p, v in zip(args.image, result.vectors)]
    if args.format == "json":
        _json({"model": result.model, "data": [{"input": i, "modality": m, "embedding": v, "truncated": c}
                                               for i, m, v, c in rows]})
        return
    _table(f"embeddings ({result.model}, {len(rows[0][2])}-d)", ["input", "modality", "norm", "first values"],
           [[i, m + (" (truncated)" if c else ""), sum(x * x for x in v) ** 0.5, " ".join(f"{x:+.3f}" for x in v[:4])]
            for i, m, v, c in rows])


def _classify(client: Client, args: argparse.Namespace) -> None:
    labels = [label.strip() for group in args.labels for label in group.split(",") if label.strip()]
    results = client.classify(args.images, labels, templates=args.template, top_k=args.top_k)
    if args.format == "json":
        _json([{"image": str(args.images[r.index]), "labels": [s.model_dump() for s in r.labels]} for r in results])
        return
    _table("classification", ["image", "label", "score"],
           [[str(args.images[r.index]) if rank == 0 else "", s.label, s.score]
            for r in results for rank, s in enumerate(r.labels)])


def _tags(client: Client, args: argparse.Namespace) -> None:
    results = client.tags(args.images, top_k=args.top_k, threshold=args.threshold)
    if args.format == "json":
        _json([{"image": str(args.images[r.index]), "tags": [t.model_dump() for t in r.tags]} for r in results])
        return
    _table("tags", ["image", "tag", "probability"],
           [[str(args.images[r.index]) if rank == 0 else "", t.tag, t.probability]
            for r in results for rank, t in enumerate(r.tags)])


def _search(client: Client, args: argparse.Namespace) -> None:
    if sum(x is not None for x in (args.query, args.image, args.id)) != 1:
        raise SystemExit("search: give exactly one of a text query, --image or --id")
    result = client.search(args.collection, args.query, image=args.image, id=args.id, top_k=args.top_k,
                           offset=args.offset, tags=args.tag, attributes=dict(map(_attr, args.attr)),
                           templates=args.templates)
    if args.format == "json":
        _json(result.model_dump(mode="json"))
        return
    _table(f"{args.collection}: {len(result.results)} results", ["#", "id", "score", "caption", "tags"],
           [[args.offset + i + 1, h.id, h.score, h.caption or "", ", ".join(h.tags)]
            for i, h in enumerate(result.results)])


def _ingest(client: Client, args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from hqclip_client.ingest import ingest

    with Progress(TextColumn("[bold]ingest"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} img/s"),
                  TimeRemainingColumn(), console=_console(stderr=True), transient=args.format == "json") as bar:
        task = bar.add_task("ingest", total=None)
        summary = ingest(client, args.folder, args.collection, batch_size=args.batch_size, state_path=args.state,
                         restart=args.restart, create=args.create, index={"kind": args.kind} if args.kind else None,
                         thumbnails=not args.no_thumbnails, refine=args.refine,
                         on_start=lambda total: bar.update(task, total=total),
                         on_progress=lambda n: bar.advance(task, n))
    if args.format == "json":
        _json(summary.__dict__)
    else:
        _table(f"ingest into '{args.collection}' ({summary.count} items now)", ["added", "skipped", "failed", "files"],
               [[summary.added, summary.skipped, len(summary.failed), summary.total]])
        if summary.failed:
            _table("failed (fix or remove them, then rerun: added files are skipped)", ["file", "reason"],
                   [[name, reason] for name, reason in sorted(summary.failed.items())])
        _console(stderr=True).print(f"state: {summary.state}", markup=False)
    if summary.failed:
        raise SystemExit(1)


def _refine(client: Client, args: argparse.Namespace) -> None:
    results = client.refine(args.images, alt_texts=args.alt_text)
    if args.format == "json":
        _json([{"image": str(p), **r.model_dump(mode="json")} for p, r in zip(args.images, results)])
        return
    for path, r in zip(args.images, results):
        _table(f"{path} ({r.model})", ["field", "value"],
               [["desc", " ".join(r.desc)], ["neg_desc", " ".join(r.neg_desc)], ["tags", ", ".join(r.tags)],
                ["neg_tags", ", ".join(r.neg_tags)]])


def _collections(client: Client, args: argparse.Namespace) -> None:
    if args.action != "list" and not args.name:
        raise SystemExit(f"collections {args.action}: give the collection's name")
    if args.action == "delete":
        client.delete_collection(args.name)
        found: list = []
    elif args.action == "create":
        found = [client.create_collection(args.name, index={"kind": args.kind} if args.kind else None)]
    elif args.action == "show":
        found = [client.get_collection(args.name)]
    else:
        found = client.list_collections()
    if args.format == "json":
        _json([c.model_dump(mode="json") for c in found] if args.action == "list" else
              (found[0].model_dump(mode="json") if found else {"deleted": args.name}))
    elif args.action == "delete":
        _console().print(f"deleted {args.name}")
    else:
        _table("collections", ["name", "kind", "dim", "count", "model"],
               [[c.name, c.kind, c.dim, c.count, c.model or ""] for c in found])


COMMANDS = {"embed": _embed, "classify": _classify, "tags": _tags, "search": _search, "ingest": _ingest,
            "refine": _refine, "collections": _collections}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    _console()  # fail early, with the install hint, when rich is missing
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout, max_items=args.max_items) as client:
            COMMANDS[args.command](client, args)
    except (HQClipError, OSError, ValueError) as exc:
        from rich.text import Text

        _console(stderr=True).print(Text("error: ", style="red") + Text(str(exc)), highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
