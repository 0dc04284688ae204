"""The "bring your own data" commands: download, scrape, dedup, combine. `register(app)` adds them to a Typer app.

Expected problems are raised as LookalikeError; `lookalike.cli.main` turns them into one-line messages.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ConfigError, LookalikeError
from .console import EXIT_PARTIAL


def _split_list(values: list[str] | None) -> list[str]:
    """Accept both `--x a,b` and `--x a --x b`."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def download_command(
    url_list: Annotated[Path, typer.Argument(help="Text file of attribute<TAB>url lines (or attribute,url CSV lines).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to fill: one sub-folder per attribute.", show_default=False)],
    workers: Annotated[int, typer.Option(help="Downloads running at once.", min=1, max=64)] = 8,
    per_host: Annotated[int, typer.Option(help="At most this many at once from any one web site (be polite).", min=1)] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds one attempt may take for the whole file.", min=0.1)] = 20.0,
    retries: Annotated[int, typer.Option(help="Extra attempts after a timeout, dropped connection, 429 or 5xx (waits 1, 2, 4... s).", min=0)] = 3,
    max_mb: Annotated[float, typer.Option(help="Refuse files larger than this many megabytes.", min=0.01)] = 50.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Download the images of a URL list into a folder-per-attribute dataset.

    \b
    The list has one image per line, the attribute (the sub-folder it goes to) and its URL:
        striped<TAB>https://example.com/shirt1.jpg
        dotted<TAB>https://example.com/blouse7.png
    (a header-less CSV "striped,https://..." works too; blank lines and # comments are ignored).

    Every image is saved as OUT/<attribute>/<16 hex digits of sha1(url)>.<ext>, so running the
    same command again skips what is already there and only fetches what is missing or broken.
    Bytes are kept only if they decode as an image, and files are written atomically: an
    interrupted run never leaves a half-written file. Broken links are expected (many web images
    disappear): they are listed with the reason in OUT/download_report.json and
    OUT/download_report.tsv; the TSV is itself a URL list, to retry just the failures.

    \b
    Examples:
        lookalike download fashionTextureUrls.tsv --out data/fashionTexture
        lookalike download urls.tsv --out data/mine --workers 16 --timeout 10
        lookalike download data/mine/download_report.tsv --out data/mine   # retry failures
    """
    from ..datatools.download import REPORT_JSON, REPORT_TSV, download, failure_reasons

    report = download(url_list, out, workers=workers, per_host=per_host, timeout=timeout, retries=retries, max_bytes=int(max_mb * 1024 * 1024), progress=progress)
    s = report.summary()
    typer.echo(f"{s['downloaded']} downloaded, {s['existing']} already there, {s['failed']} failed (of {s['urls']} URLs)")
    for reason, n in failure_reasons(report.results).items():
        typer.echo(f"  {n:5d} x {reason}")
    if s["invalid_lines"]:
        typer.echo(f"{s['invalid_lines']} line(s) of {url_list} could not be read; see the report")
    if s["repeated_urls"]:
        typer.echo(f"{s['repeated_urls']} repeated URL(s) were downloaded once")
    if s["conflicting_urls"]:
        typer.echo(f"{s['conflicting_urls']} URL(s) listed under two different attributes were skipped (an image must have exactly one attribute)")
    typer.echo(f"report: {Path(report.out_dir) / REPORT_JSON} (failures also in {REPORT_TSV})")
    if s["downloaded"] + s["existing"] == 0:
        raise LookalikeError(f"no image could be downloaded from {url_list}; see the reasons above and in the report")
    if s["failed"]:
        raise typer.Exit(EXIT_PARTIAL)


def scrape_command(
    attributes: Annotated[list[str], typer.Option("--attributes", "-a", help="Attribute values to search for, comma-separated or repeated; each becomes a folder.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="URL list to write (attribute<TAB>url), the input of `lookalike download`.")] = Path("urls.tsv"),
    items: Annotated[Optional[list[str]], typer.Option("--items", "-i", help="Object words combined with every attribute, comma-separated or repeated.", show_default=False)] = None,
    per_query: Annotated[int, typer.Option(help="Top results to keep per query.", min=1, max=1000)] = 50,
    template: Annotated[str, typer.Option(help="How a query is written; {item} and {attribute} are filled in.")] = "{item} {attribute}",
    endpoint: Annotated[Optional[str], typer.Option(help="Search API URL (default: BING_SEARCH_ENDPOINT, else Bing's v7 endpoint).", show_default=False)] = None,
    market: Annotated[Optional[str], typer.Option(help="Market code, e.g. en-US.", show_default=False)] = None,
    safe_search: Annotated[str, typer.Option(help="Off, Moderate or Strict.")] = "Moderate",
    list_queries: Annotated[bool, typer.Option("--list-queries", help="Only print the queries that would be sent; needs no key.")] = False,
) -> None:
    """Build a URL list with an image search API, as the tutorial built its data set.

    Queries are every item x attribute combination: 7 clothing items x 3 textures make 21 queries,
    "blouse striped", "hoodie striped", ... "vest leopard", and the top 50 results of each give up
    to 1,050 images. Each result URL is listed under the attribute of its query; a URL found
    under two different attributes is left out as ambiguous.

    Uses the Bing Image Search v7 API with the subscription key in the BING_SEARCH_KEY
    environment variable. Search results are not labels: look through the downloaded images and
    remove wrong or ambiguous ones before training, then run `lookalike dedup`.

    \b
    Examples:
        export BING_SEARCH_KEY=...
        lookalike scrape --attributes striped,dotted,leopard \\
            --items blouse,hoodie,pullover,sweater,shirt,tshirt,vest --per-query 50 --out urls.tsv
        lookalike download urls.tsv --out data/fashionTexture
        lookalike scrape -a striped,dotted -i shirt,dress --list-queries
    """
    from ..datatools.scrape import BingImageSearch, scrape, synthesize_queries, write_url_list

    queries = synthesize_queries(_split_list(attributes), _split_list(items), template)
    if list_queries:
        for q in queries:
            typer.echo(f"{q.attribute}\t{q.text}")
        return
    with BingImageSearch(endpoint=endpoint, market=market, safe_search=safe_search) as provider:
        typer.echo(f"{len(queries)} queries x top {per_query} results from {provider.endpoint}")
        result = scrape(provider, queries, per_query, progress=lambda q, n: typer.echo(f"  {q.text!r}: {n} results", err=True))
    write_url_list(result.rows, out)
    typer.echo(f"wrote {len(result.rows)} URLs to {out}" + (f"; left out {len(result.ambiguous)} found under several attributes" if result.ambiguous else ""))
    typer.echo(f"next: lookalike download {out} --out DATA_FOLDER")


def dedup_command(
    folder: Annotated[Path, typer.Argument(help="Dataset folder (one sub-folder per attribute).", show_default=False)],
    hash_size: Annotated[int, typer.Option(help="dhash size: the hash has hash_size x hash_size bits (16 = 256 bits, the tutorial's choice).", min=2, max=64)] = 16,
    max_distance: Annotated[Optional[int], typer.Option(help="Most differing bits for a near duplicate; 0 = identical hashes only. Default: hash_size^2/16 (16 bits at size 16).", min=0, show_default=False)] = None,
    quarantine_dir: Annotated[Optional[Path], typer.Option("--quarantine", help="Where duplicates are moved (default: FOLDER-duplicates beside the dataset).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report; move nothing.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Also write the JSON report here (default: QUARANTINE/dedup_report.json when files are moved).", show_default=False)] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Find exact and near-duplicate images and move the extra copies aside (never deletes).

    Web-scraped data holds many copies of one picture at other sizes, crops or JPEG qualities. If
    one copy lands in training and another in test, the test measures memory, not similarity.
    Exact copies are found by checksum; near copies by the difference hash (dhash) of each image:
    two images whose hashes differ in at most --max-distance bits are one group. In each group
    the largest picture stays and the others move to the quarantine folder under the same relative
    path (e.g. QUARANTINE/striped/123.jpg), with dedup_report.json saying which image each
    duplicated. Move a file back to undo. Groups that span two attributes are flagged: one of the
    labels is probably wrong.

    \b
    Examples:
        lookalike dedup data/fashionTexture --dry-run
        lookalike dedup data/fashionTexture
        lookalike dedup data/mine --max-distance 0                # identical hashes only
        lookalike dedup data/mine --hash-size 8 --max-distance 4 --quarantine /tmp/dups
    """
    from ..datatools.dedup import REPORT_NAME, check_quarantine, default_quarantine, find_duplicates, quarantine

    q = check_quarantine(folder, quarantine_dir if quarantine_dir is not None else default_quarantine(folder))
    result = find_duplicates(folder, hash_size, max_distance, progress=progress)
    quarantine(result, q, dry_run=dry_run, report_path=report)
    d = result.to_dict()
    unreadable = f" ({len(result.unreadable)} unreadable, left out)" if result.unreadable else ""
    typer.echo(f"{d['images']} images{unreadable}, {d['groups']} duplicate group(s): {d['exact_duplicates']} exact and {d['near_duplicates']} near duplicate(s) "
               f"(hash size {result.hash_size}, max distance {result.max_distance} bits)")
    shown = 20
    for group in result.groups[:shown]:
        flag = "  [different attributes!]" if len(group.attributes) > 1 else ""
        typer.echo(f"  keep {group.keep}{flag}")
        for dup in group.duplicates:
            typer.echo(f"    {'would move' if dry_run else 'moved'} {dup['path']} ({dup['kind']}, {dup['distance']} bits)")
    if len(result.groups) > shown:
        typer.echo(f"  ... and {len(result.groups) - shown} more group(s); see the report")
    failed = [m for m in result.moves if "error" in m]
    for m in failed:
        typer.echo(f"  {m['from']}: {m['error']}", err=True)
    for u in result.unreadable:
        typer.echo(f"  skipped {u['path']}: {u['reason']}", err=True)
    if dry_run:
        typer.echo("dry run: nothing moved" + (f"; report written to {report}" if report else ""))
    elif result.moves:
        typer.echo(f"moved {len(result.moves) - len(failed)} file(s) to {q}; report: {report or q / REPORT_NAME}")
    if failed:
        raise LookalikeError(f"{len(failed)} duplicate(s) could not be moved into {q}; see above")
    if result.unreadable:
        raise typer.Exit(EXIT_PARTIAL)  # the other images were compared; the unreadable ones could hide duplicates


def combine_command(
    score_files: Annotated[list[Path], typer.Argument(help="One CSV per ranker with columns query,reference,probability.", show_default=False)],
    weight: Annotated[Optional[list[float]], typer.Option("--weight", "-w", help="Weight of each file, in order (repeat once per file). Default: equal.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Fused CSV to write (default: print to the terminal).", show_default=False)] = None,
) -> None:
    """Combine rankers of different attribute families into one similarity, in probability space.

    Train one ranker per attribute family (texture, sleeve length, neck style...), score the same
    (query, reference) pairs with each, and combine their calibrated probabilities by a
    (weighted) average. Never average raw scores: each ranker's scores have their own scale.
    Example from the tutorial, a query against two reference images over three rankers:

    \b
        raw scores     image 1 (wrong): 0.2, 1.9, 0.3 -> mean 0.80   <- wins, wrongly
                       image 2 (right): 0.7, 0.8, 0.7 -> mean 0.73
        probabilities  image 1 (wrong): 15%, 99%, 20% -> mean 45%
                       image 2 (right): 78%, 85%, 78% -> mean 80%    <- wins, rightly

    The output has query, reference, rank (1 = most similar for that query), the fused
    probability and each ranker's probability; rows are grouped by query, highest first.

    \b
    Examples:
        lookalike combine texture.csv sleeves.csv neck.csv --out fused.csv
        lookalike combine texture.csv sleeves.csv --weight 2 --weight 1 --out fused.csv
    """
    from ..datatools.fusion import combine_score_files, format_fused, write_fused

    if weight and len(weight) != len(score_files):
        raise ConfigError(f"got {len(weight)} --weight value(s) for {len(score_files)} score file(s); give one per file, in the same order")
    names, pairs = combine_score_files(score_files, weight)
    if out is None:
        sys.stdout.write(format_fused(names, pairs))
        return
    write_fused(out, names, pairs)
    queries = len({p.query for p in pairs})
    typer.echo(f"fused {len(names)} rankers ({', '.join(names)}) over {len(pairs)} pairs of {queries} queries -> {out}")


def _reflow(doc: str | None) -> str:
    """Join each paragraph's source lines into one, so the help wraps to the terminal; \\b blocks stay verbatim."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


def register(app: typer.Typer) -> None:
    """Add the data tools to `app` as commands download, scrape, dedup and combine."""
    for name, command in (("download", download_command), ("scrape", scrape_command), ("dedup", dedup_command), ("combine", combine_command)):
        app.command(name, help=_reflow(command.__doc__))(command)
