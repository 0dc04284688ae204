"""`lookalike index ...`: a searchable, updatable catalog of your images, ranked by the learned distance."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError, LookalikeError
from ..images import LOOKED_FOR
from ..index.api import ImageIndex as CatalogIndex
from ..index.backends import BACKENDS, IndexLocation, IndexStore
from ..index.build import absolute, build_index, load_model
from ..index.ingest import image_sources, ingest
from ..index.metric import METRICS, IndexMetric
from ..index.vectors import DEFAULT_PARAMS, EXACT_BELOW, HNSW_BELOW
from ..results import format_probability
from .console import EXIT_PARTIAL, err, out, print_matches, search_answer

index_app = typer.Typer(
    name="index",
    help=(
        "A catalog of images you can search for lookalikes, grow and shrink without rebuilding.\n\n"
        "  lookalike index build --model models/mine --images photos/ --out photos.index\n\n"
        "  lookalike index search photos.index query.jpg --top 15 --grid matches.png\n\n"
        "  lookalike index add photos.index new_photos/      (embeds only new or changed files)\n\n"
        "  lookalike index remove photos.index photos/old/\n\n"
        "  lookalike index compact photos.index              (drops removed images' stored vectors)\n\n"
        "Images are embedded with the model's backbone (refined if present) and ranked by its learned "
        "weighted L2 distance, with the calibrated probability that a match shares the query's attribute. "
        f"Catalogs under {EXACT_BELOW:,} images are searched exactly; larger ones approximately "
        f"(HNSW below {HNSW_BELOW:,}, IVF-PQ above), with an exact re-ranking of the shortlist."
    ),
    no_args_is_help=True,
)

IndexDirArg = typer.Argument(..., help="The index folder (made by `lookalike index build`); with --backend milvus, the collection's name.")
BackendOpt = typer.Option("faiss", "--backend", help=f"Where the index lives: {' or '.join(BACKENDS)} (a collection in Milvus at --uri; needs `pip install 'lookalike\\[milvus]'`).")
UriOpt = typer.Option(None, "--uri", help="With --backend milvus: a Milvus Lite file (catalog.db, no server) or a Milvus server (http://host:19530).")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of tables.")
KindOpt = typer.Option("auto", "--kind", help="auto (by size), flat (exact), hnsw (graph) or ivfpq (compressed, for catalogs past RAM); in Milvus: auto, flat, hnsw or diskann (servers only).")


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")


def _print_report(action: str, report, index: IndexStore, as_json: bool) -> None:
    """The ingest report; images that could not be indexed make it a partial success (exit code 3)."""
    stats = index.stats()
    if as_json:
        print(json.dumps({"action": action, **report.to_dict(), "images": stats["images"], "kind": stats["kind"]}, indent=2))
        if report.skipped:
            raise typer.Exit(EXIT_PARTIAL)
        return
    out.print(
        f"{action}: {report.added} new, {report.changed} changed, {report.unchanged} unchanged "
        f"({report.embedded} embedded, {report.reused_vectors} reused by content hash); "
        f"index now holds {stats['images']:,} images ({stats['kind'] or 'empty'})"
    )
    if report.compacted:
        out.print("  compacted the stored vectors (removed and replaced images' rows dropped)")
    for s in report.skipped:
        out.print(f"  [yellow]skipped[/yellow] {escape(s['path'])}: {escape(s['reason'])}")
    if report.skipped:
        raise typer.Exit(EXIT_PARTIAL)


@index_app.command()
def build(
    run: Path = typer.Option(..., "--model", "-m", "--run", "-r", help="Model folder (`lookalike fit`) or run folder (`lookalike run`): what embeds and ranks the images."),
    images: str = typer.Option(..., "--images", "-i", help="Folder of images; a top-level sub-folder name becomes the image's attribute. With --executor ray also s3://bucket/prefix."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Index folder to create; with --backend milvus, the collection's name."),
    kind: str = KindOpt,
    distance: str = typer.Option("learned", "--distance", help=f"Rank by: {', '.join(METRICS)}."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing index in --out."),
    chunk: int = typer.Option(1024, "--chunk", min=1, help="Images committed per step; an interrupted build resumes from the last step."),
    executor: str = typer.Option("local", "--executor", help="local (this process) or ray (embed on a Ray cluster into Parquet shards, then index them; see docs/scale-out.md)."),
    address: Optional[str] = typer.Option(None, help="With --executor ray: the cluster (auto, or ray://HOST:10001); default a private local instance."),
    backend: str = BackendOpt,
    uri: Optional[str] = UriOpt,
    as_json: bool = JsonOpt,
):
    """Embed every image under --images into a new index (rerun the same command to resume an interrupted build)."""
    location = IndexLocation.parse(out_dir, backend, uri)
    if executor == "ray":
        from ..distributed import ModelSpec, featurize_and_index

        model, _ = load_model(run)
        result = featurize_and_index(
            images, location, ModelSpec.of(run=str(run)), IndexMetric.from_ranker(model.ranker_, distance),
            backbone=model.backbone_, address=address, kind=kind, run_dir=absolute(run), overwrite=overwrite,
        )
        if as_json:
            print(json.dumps(result, indent=2, default=str))
        else:
            out.print(f"build (ray): {escape(str(result))}")
        return
    if executor != "local" or address is not None:
        raise ConfigError("--executor is local or ray, and --address goes with --executor ray")
    if "://" in images:
        raise ConfigError(f"--images {images}: remote folders need --executor ray")
    report, _ = build_index(run, images, location, kind, distance, overwrite, chunk)
    with location.open() as index:
        _print_report("build", report, index, as_json)


@index_app.command()
def add(
    index_dir: Path = IndexDirArg,
    images: Path = typer.Argument(..., help="Folder of images to add or refresh."),
    run: Optional[Path] = typer.Option(None, "--model", "-m", "--run", "-r", help="Model or run folder to embed with (default: the one the index was built with)."),
    chunk: int = typer.Option(1024, "--chunk", min=1, help="Images committed per step."),
    compact_above: Optional[float] = typer.Option(
        None, "--compact-above", min=0.0, max=1.0,
        help=f"Compact when removed or replaced images hold more than this share of the stored vectors (default: the index's compact_above, {DEFAULT_PARAMS['compact_above']}; 1 = never).",
    ),
    backend: str = BackendOpt,
    uri: Optional[str] = UriOpt,
    as_json: bool = JsonOpt,
):
    """Add new images and re-embed changed ones; unchanged files (same size and time, or same content) cost nothing."""
    with IndexLocation.parse(index_dir, backend, uri).open(writable=True) as index:
        _, embedder = load_model(run, index)
        report = ingest(index, images, embedder, chunk_size=chunk, compact_above=compact_above)
        _print_report("add", report, index, as_json)


@index_app.command()
def remove(
    index_dir: Path = IndexDirArg,
    paths: List[Path] = typer.Argument(..., help="Image files or folders to take out of the index (the files themselves are not touched)."),
    backend: str = BackendOpt,
    uri: Optional[str] = UriOpt,
    as_json: bool = JsonOpt,
):
    """Take images out of the index by path; a folder removes everything below it."""
    with IndexLocation.parse(index_dir, backend, uri).open(writable=True) as index:
        ids, missing = [], []
        for p in paths:
            entries = index.entries_by_path(absolute(p))
            if entries:
                ids.extend(e.id for e in entries.values())
            else:
                missing.append(absolute(p))
        removed = index.remove(ids)
        index.merge()
        if as_json:  # the keys of build's and add's reports where they mean the same; paths absolute, as the catalog stores them
            print(json.dumps({"action": "remove", "removed": removed, "not_in_index": missing, "images": index.size}, indent=2))
            return
        out.print(f"removed {removed} image(s); index now holds {index.size:,}")
        for m in missing:
            out.print(f"  [yellow]not in the index:[/yellow] {escape(m)}")


@index_app.command()
def search(
    index_dir: Path = IndexDirArg,
    queries: List[Path] = typer.Argument(..., help="Query images, or folders of them (need not be in the index)."),
    top: int = typer.Option(15, "--top", "-k", min=1, help="How many matches to show per query."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="One query only: also save the tutorial's picture of the query and its matches (.png/.jpg)."),
    keep_self: bool = typer.Option(False, "--keep-self", help="When a query is itself in the index, list it too (first; it is left out by default)."),
    run: Optional[Path] = typer.Option(None, "--model", "-m", "--run", "-r", help="Model or run folder to embed the queries with (default: the one the index was built with)."),
    rerank: Optional[int] = typer.Option(None, min=1, help=f"Approximate kinds: shortlist size re-ranked exactly (default: the index's own, {DEFAULT_PARAMS['rerank']} unless IVF-PQ's build chose it)."),
    ef_search: Optional[int] = typer.Option(None, min=1, help=f"HNSW: search breadth (default {DEFAULT_PARAMS['ef_search']})."),
    nprobe: Optional[int] = typer.Option(None, min=1, help="IVF-PQ: cells visited (default: the number its build chose to reach its recall target; `index stats` shows it)."),
    attribute: Optional[str] = typer.Option(None, "--attribute", "-a", help="Only matches of this attribute."),
    min_probability: Optional[float] = typer.Option(None, "--min-probability", "-p", min=0, max=1, help="Only matches at least this likely (0-1) to share the query's attribute."),
    backend: str = BackendOpt,
    uri: Optional[str] = UriOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per query and line, with the keys of REST /search."),
):
    """The images most alike to each query, by the learned distance (lower = more alike) and P(same attribute).

    Many queries are embedded in one batch: `lookalike index search photos.index a.jpg b.jpg shots/ --json`.
    """
    paths = [Path(p) for p, _ in image_sources(queries)]
    if not paths:
        raise LookalikeError(f"the query folders hold no images ({LOOKED_FOR})")
    if grid is not None and len(paths) != 1:
        raise ConfigError(f"--grid draws one query's matches; {len(paths)} queries were given (leave out --grid or pass one image)")
    params = {k: v for k, v in {"rerank": rerank, "ef_search": ef_search, "nprobe": nprobe}.items() if v is not None}
    with CatalogIndex.open(IndexLocation.parse(index_dir, backend, uri), model=run) as index:
        index.check_search(top, attribute, min_probability, params)
        start = time.perf_counter()
        skipped: list = []  # one unreadable query among many must not cost the others their answers
        vectors, own_ids = index.query_vectors(paths, skipped=skipped if len(paths) > 1 else None)
        bad = {s["path"] for s in skipped}
        paths = [p for p in paths if str(p) not in bad]
        if not paths:
            raise LookalikeError("no query could be read: " + "; ".join(f"{s['path']}: {s['reason']}" for s in skipped))
        results = index.search_vectors(vectors, top, attribute, min_probability, leave_out=None if keep_self else own_ids, params=params)
        took_ms = (time.perf_counter() - start) * 1000 / len(paths)
        description = index.store.metric.describe()
        if not index.store.build_finished:
            _warn_unfinished(index.store.size)
    if grid is not None:
        from ..visualize import retrieval_grid

        if grid.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            raise ConfigError(f"--grid {grid}: use a .png or .jpg file name")
        labels = [f"{m.attribute or ''} p={format_probability(m.probability)}" for m in results[0]]
        retrieval_grid(str(paths[0]), [(m.path, m.distance, label) for m, label in zip(results[0], labels)], grid)
    for path, own, matches in zip(paths, own_ids, results):
        if as_json:
            print(search_answer(path, own, matches, took_ms, attribute, min_probability).model_dump_json())
            continue
        print_matches(f"{len(matches)} closest to {path.name} ({description})", matches)
    if grid is not None and not as_json:
        out.print(f"grid: {grid}")
    for s in skipped:
        err.print(f"skipped {escape(s['path'])}: {escape(s['reason'])}", style="yellow")
    if skipped:
        raise typer.Exit(EXIT_PARTIAL)


@index_app.command()
def stats(index_dir: Path = IndexDirArg, backend: str = BackendOpt, uri: Optional[str] = UriOpt, as_json: bool = JsonOpt):
    """What the index holds: images per attribute, index kind, un-merged tail, tombstones, files and sizes."""
    with IndexLocation.parse(index_dir, backend, uri).open() as index:
        s, location = index.stats(), index.location
    if not s["build_finished"]:
        _warn_unfinished(s["images"])
    if as_json:
        print(json.dumps(s, indent=2))
        return
    table = Table(show_header=False, title=escape(location))
    for key, value in s.items():
        if key not in ("directory", "location", "attributes", "params", "files_bytes"):
            table.add_row(key, escape(str(value)))
    table.add_row("attributes", ", ".join(f"{a}: {n}" for a, n in s["attributes"].items()))
    if "files_bytes" in s:
        table.add_row("files", ", ".join(f"{n} {b / 2**20:.1f} MB" for n, b in s["files_bytes"].items()))
    out.print(table)


def _warn_unfinished(images: int) -> None:
    err.print(
        f"the build of this index was interrupted after {images} image(s): run the same `lookalike index build` again to finish it "
        "(searches see only the images embedded so far)",
        style="yellow",
    )


@index_app.command()
def compact(index_dir: Path = IndexDirArg, as_json: bool = JsonOpt):
    """Rewrite the stored vectors without removed images' rows; ids and search results stay the same, and searches go on meanwhile.

    For a FAISS index folder; a Milvus collection compacts itself.
    """
    with IndexLocation.parse(index_dir).open(writable=True) as index:
        dropped = index.stats()["dead_rows"]
        done = index.compact()
        s = index.stats()
    if as_json:
        print(json.dumps({"compacted": done, "dropped_rows": dropped if done else 0, "vector_rows": s["vector_rows"], "images": s["images"]}, indent=2))
    elif done:
        out.print(f"compacted: dropped {dropped:,} removed images' vectors; {s['vector_rows']:,} stored for {s['images']:,} images")
    else:
        out.print("nothing to compact: every stored vector belongs to an image in the index")


@index_app.command()
def reindex(
    index_dir: Path = IndexDirArg,
    kind: Optional[str] = typer.Option(None, "--kind", help="the kind to rebuild as (see `index build --kind`); default: the index's own kind, so a rebuild that only drops removed images' leftovers changes nothing else"),
    backend: str = BackendOpt,
    uri: Optional[str] = UriOpt,
    as_json: bool = JsonOpt,
):
    """Rebuild the vector index from the stored vectors (no re-embedding): switch kind, or drop removed images' leftovers."""
    with IndexLocation.parse(index_dir, backend, uri).open(writable=True) as index:
        index.reindex(kind, progress=not as_json)
        s = index.stats()
    if as_json:
        print(json.dumps(s, indent=2))
    else:
        out.print(f"reindexed {s['images']:,} images as {s['kind']}")
