"""Download a URL list into a folder-per-attribute dataset, politely, resumably and without half-written files.

The list format is the tutorial's: one `attribute<TAB>url` per line (a header-less `attribute,url`
CSV works too). Each image lands at `OUT/<attribute>/<sha1(url)[:16]>.<ext>`, so a rerun finds
what it already has and skips it. Bytes are kept only when they decode as an image; every URL that
did not make it is listed, with the reason, in `OUT/download_report.json` and
`OUT/download_report.tsv` (the TSV is itself a URL list: feed it back to retry just the failures).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urldefrag, urlsplit

import anyio
import httpx
from anyio.from_thread import start_blocking_portal
from PIL import Image

from ..errors import BadImageError, LookalikeError
from ..fileio import atomic_path, write_bytes, write_json, write_text
from ..images import FORMAT_EXTENSIONS, IMAGE_EXTENSIONS, open_image, open_image_bytes
from ..progress import tqdm

REPORT_JSON = "download_report.json"
REPORT_TSV = "download_report.tsv"

USER_AGENT = "lookalike-downloader/0.1 (+https://pypi.org/project/lookalike/; image dataset builder)"
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_NAME_RE = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class UrlEntry:
    attribute: str
    url: str
    line: int  # 1-based line number in the list file


@dataclass
class UrlList:
    entries: list[UrlEntry]
    invalid_lines: list[dict] = field(default_factory=list)  # {"line", "text", "reason"}
    repeated: list[dict] = field(default_factory=list)  # same URL and attribute again: downloaded once
    conflicts: list[dict] = field(default_factory=list)  # same URL under different attributes: skipped


@dataclass
class DownloadResult:
    attribute: str
    url: str
    line: int
    status: str  # "downloaded", "existing" or "failed"
    path: str = ""  # relative to the output folder, forward slashes
    reason: str = ""
    http_status: int | None = None
    attempts: int = 0
    converted_from: str = ""  # original format when re-encoded to PNG


@dataclass
class DownloadReport:
    out_dir: str
    results: list[DownloadResult]
    url_list: UrlList

    @property
    def failed(self) -> list[DownloadResult]:
        return [r for r in self.results if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    def summary(self) -> dict:
        return {
            "urls": len(self.results),
            "downloaded": self.count("downloaded"),
            "existing": self.count("existing"),
            "failed": self.count("failed"),
            "invalid_lines": len(self.url_list.invalid_lines),
            "repeated_urls": len(self.url_list.repeated),
            "conflicting_urls": len(self.url_list.conflicts),
        }

    def to_dict(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "summary": self.summary(),
            "failed": [_failure_dict(r) for r in self.failed],
            "invalid_lines": self.url_list.invalid_lines,
            "conflicting_urls": self.url_list.conflicts,
            "repeated_urls": self.url_list.repeated,
            "files": [{"attribute": r.attribute, "url": r.url, "path": r.path, "status": r.status, **({"converted_from": r.converted_from} if r.converted_from else {})}
                      for r in self.results if r.status != "failed"],
        }


def _failure_dict(r: DownloadResult) -> dict:
    d = {"attribute": r.attribute, "url": r.url, "line": r.line, "reason": r.reason, "attempts": r.attempts}
    if r.http_status is not None:
        d["http_status"] = r.http_status
    return d


# --------------------------------------------------------------------------- reading the list


def read_url_list(path: str | os.PathLike) -> UrlList:
    """Parse `attribute<TAB>url` lines (or `attribute,url` CSV lines).

    Blank lines and `#` comments are ignored, as is a header line naming the columns
    (`attribute`, `url`); columns after the second are ignored, so a download_report.tsv reads back
    as a list of the failed URLs. A URL repeated under the same attribute is downloaded once; a URL
    listed under two different attributes is skipped and reported, because an image must belong to
    exactly one attribute.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LookalikeError(f"URL list {path} does not exist") from None
    except UnicodeDecodeError:
        raise LookalikeError(f"URL list {path} is not UTF-8 text; expected lines of attribute<TAB>url") from None
    except OSError as e:
        raise LookalikeError(f"cannot read URL list {path} ({e.strerror or e})") from None

    result = UrlList(entries=[])
    first: dict[str, UrlEntry] = {}
    conflicted: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in (line.split("\t") if "\t" in line else next(csv.reader([line])))]
        if len(fields) >= 2 and fields[0].lower() == "attribute" and fields[1].lower() == "url":
            continue
        problem = _check_fields(fields)
        if problem:
            result.invalid_lines.append({"line": number, "text": raw[:300], "reason": problem})
            continue
        attribute, url = fields[0], urldefrag(fields[1])[0]
        entry = UrlEntry(attribute, url, number)
        seen = first.get(url)
        if seen is None:
            first[url] = entry
            result.entries.append(entry)
        elif seen.attribute == attribute:
            result.repeated.append({"line": number, "url": url, "first_line": seen.line})
        else:
            result.conflicts.append({"line": number, "url": url, "attribute": attribute, "first_line": seen.line, "first_attribute": seen.attribute})
            conflicted.add(url)
    if conflicted:
        result.entries = [e for e in result.entries if e.url not in conflicted]
    return result


#: Longest attribute accepted, in UTF-8 bytes: it becomes a folder name (file systems allow 255).
MAX_ATTRIBUTE_BYTES = 200


def _check_fields(fields: list[str]) -> str:
    if len(fields) < 2 or not fields[0] or not fields[1]:
        return "expected two columns: attribute<TAB>url"
    attribute, url = fields[0], fields[1]
    if attribute in (".", "..") or attribute.startswith(".") or any(c in attribute for c in '/\\:*?"<>|\0'):
        return f"attribute {attribute!r} cannot be a folder name (no slashes, no leading dot)"
    if len(attribute.encode("utf-8")) > MAX_ATTRIBUTE_BYTES:
        return f"attribute {attribute[:40]!r}... is {len(attribute.encode('utf-8'))} bytes long; a folder name may have at most {MAX_ATTRIBUTE_BYTES}"
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return f"not an http(s) URL: {url[:100]!r}"
    return ""


# --------------------------------------------------------------------------- file naming and resume


def url_stem(url: str) -> str:
    """The deterministic file name (without extension) for a URL."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def find_existing(folder: Path, stem: str) -> Path | None:
    """A file in `folder` named `<stem>.<image ext>`, if any (the extension depends on the sniffed format)."""
    for ext in sorted(IMAGE_EXTENSIONS):
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _clean_stale_temporaries(folder: Path) -> None:
    """Remove temporary files a killed earlier run left behind (hidden `.<stem>.<ext>.*.tmp`)."""
    if not folder.is_dir():
        return
    for p in folder.glob(".*.tmp"):
        stem = p.name[1:].split(".", 1)[0]
        if _NAME_RE.match(stem):
            try:
                p.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------- the HTTP side


class _Failure(Exception):
    def __init__(self, reason: str, retry: bool, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.http_status = http_status
        self.retry_after = retry_after


class _HostLimiter:
    """At most `per_host` requests in flight to any one host."""

    def __init__(self, per_host: int):
        self.per_host = per_host
        self._lock = threading.Lock()
        self._semaphores: dict[str, threading.Semaphore] = {}

    def __call__(self, url: str) -> threading.Semaphore:
        host = (urlsplit(url).hostname or "").lower()
        with self._lock:
            sem = self._semaphores.get(host)
            if sem is None:
                sem = self._semaphores[host] = threading.Semaphore(self.per_host)
            return sem


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


async def _fetch(client: httpx.AsyncClient, url: str, timeout: float, max_bytes: int) -> tuple[bytes, str]:
    """One attempt: (body, content type) within `timeout` seconds, or a _Failure saying whether to retry.

    httpx's timeouts bound each socket operation, not a whole request (encode/httpx#1450), so a
    server sending one header byte a second never trips them. The deadline is therefore an anyio
    cancel scope around the whole attempt (connect, redirects, headers, body): cancelling it aborts
    the request wherever it waits and closes its connection. This is why the fetches run on an
    event loop (see `download`) while decoding and writing stay in the worker threads.
    """
    try:
        with anyio.fail_after(timeout):
            async with client.stream("GET", url) as response:
                status = response.status_code
                if status >= 400:
                    retry = status in _RETRY_STATUS
                    phrase = response.reason_phrase or ""
                    raise _Failure(f"HTTP {status} {phrase}".strip(), retry, status, _retry_after_seconds(response.headers.get("Retry-After")))
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise _Failure(f"file is {int(declared):,} bytes, over the {max_bytes:,}-byte limit", False, status)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise _Failure(f"file is over the {max_bytes:,}-byte limit", False, status)
                    chunks.append(chunk)
                body = b"".join(chunks)
                content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    except _Failure:
        raise
    except (TimeoutError, httpx.TimeoutException):  # the deadline, or a passed-in client's own timeouts
        raise _Failure(f"timed out after {timeout:g} s", True) from None
    except httpx.TooManyRedirects:
        raise _Failure("too many redirects", False) from None
    except httpx.RemoteProtocolError as e:
        raise _Failure(f"truncated: the connection closed mid-transfer ({e})", True) from None
    except (httpx.ConnectError, httpx.NetworkError) as e:
        raise _Failure(f"connection failed ({e or type(e).__name__})", True) from None
    except httpx.HTTPError as e:  # unsupported protocol, invalid URL, decoding errors...
        raise _Failure(f"request failed ({type(e).__name__}: {e})", False) from None
    return body, content_type


def _keep(data: bytes, content_type: str, url: str, target_dir: Path, stem: str) -> tuple[Path, str]:
    """Validate the bytes as an image and write them atomically; returns (path, converted_from)."""
    try:
        image = open_image_bytes(data, name=url)
    except BadImageError as e:
        hint = f" (server said Content-Type: {content_type})" if content_type and not content_type.startswith("image/") else ""
        raise _Failure(f"not a usable image: {e.reason}{hint}", False) from None
    with Image.open(io.BytesIO(data)) as probe:
        fmt = probe.format or ""
    ext = FORMAT_EXTENSIONS.get(fmt)  # kept byte for byte; anything else that decodes (GIF...) is re-encoded as PNG
    if ext:
        path = target_dir / f"{stem}{ext}"
        write_bytes(path, data)
        converted = ""
    else:
        path = target_dir / f"{stem}.png"
        with atomic_path(path, suffix=".png") as tmp:
            image.save(tmp, format="PNG")
        converted = fmt or "unknown"
    # An invalid leftover from an earlier run under another extension goes only now, after the good file is in place.
    for ext_other in IMAGE_EXTENSIONS:
        other = target_dir / f"{stem}{ext_other}"
        if other != path and other.exists():
            other.unlink()
    return path, converted


# --------------------------------------------------------------------------- the driver


def download(
    url_list: str | os.PathLike | UrlList,
    out_dir: str | os.PathLike,
    *,
    workers: int = 8,
    per_host: int = 2,
    timeout: float = 20.0,
    retries: int = 3,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    max_bytes: int = 50 * 1024 * 1024,
    progress: bool = True,
    client: httpx.AsyncClient | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> DownloadReport:
    """Download every URL of the list into `out_dir/<attribute>/` and write the reports there.

    `workers` downloads run at once, at most `per_host` of them to any one host. Each attempt must
    deliver the whole file within `timeout` seconds: connecting, redirects, headers and body
    together, however slowly the server sends them; each retry gets a new deadline. Timeouts,
    connection errors, truncated bodies, 429 and 5xx answers are retried up to `retries` more
    times, waiting `backoff * 2**k` seconds (with jitter, at most `max_backoff`, longer if the
    server sends Retry-After); other 4xx answers and bytes that are not an image fail at once.
    Files already present and valid are skipped.
    """
    if workers < 1 or per_host < 1 or retries < 0 or timeout <= 0:
        raise LookalikeError("workers and per_host must be at least 1, retries at least 0, timeout positive")
    urls = url_list if isinstance(url_list, UrlList) else read_url_list(url_list)
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LookalikeError(f"cannot create output folder {out} ({e.strerror or e})") from None
    for attribute in sorted({e.attribute for e in urls.entries}):
        _clean_stale_temporaries(out / attribute)

    limiter = _HostLimiter(per_host)
    own_client = client is None
    if own_client:
        client = httpx.AsyncClient(
            follow_redirects=True,
            max_redirects=5,
            timeout=None,  # the whole-attempt deadline in _fetch is the only one
            limits=httpx.Limits(max_connections=max(workers, 1), max_keepalive_connections=max(workers, 1)),
            headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"},
        )

    def one(entry: UrlEntry) -> DownloadResult:
        target_dir = out / entry.attribute
        stem = url_stem(entry.url)
        existing = find_existing(target_dir, stem)
        if existing is not None:
            try:
                open_image(existing)
                return DownloadResult(entry.attribute, entry.url, entry.line, "existing", _rel(out, existing))
            except BadImageError:
                pass  # re-download; the bad file is replaced only once a good one is written
        result = DownloadResult(entry.attribute, entry.url, entry.line, "failed")
        for attempt in range(retries + 1):
            result.attempts = attempt + 1
            try:
                with limiter(entry.url):
                    data, content_type = portal.call(_fetch, client, entry.url, timeout, max_bytes)
                path, converted = _keep(data, content_type, entry.url, target_dir, stem)
            except _Failure as f:
                result.reason, result.http_status = f.reason, f.http_status
                if not f.retry or attempt == retries:
                    if attempt and f.retry:
                        result.reason += f" (gave up after {attempt + 1} attempts)"
                    return result
                wait = min(max_backoff, backoff * 2**attempt) * (0.5 + random.random() / 2)
                if f.retry_after is not None:
                    wait = max(wait, min(f.retry_after, max_backoff))
                sleep(wait)
                continue
            except OSError as e:
                result.reason = f"cannot write into {target_dir} ({e.strerror or e})"
                return result
            result.status, result.path, result.converted_from, result.reason = "downloaded", _rel(out, path), converted, ""
            return result
        return result

    results: list[DownloadResult] = []
    with ExitStack() as stack:
        portal = stack.enter_context(start_blocking_portal())  # the event loop every fetch runs on (see _fetch)
        if own_client:
            stack.enter_context(portal.wrap_async_context_manager(client))
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download"))
        futures = [pool.submit(one, e) for e in urls.entries]
        bar = tqdm(total=len(futures), desc="Downloading", unit="url", disable=not progress or not futures)
        n_failed = 0
        try:
            for fut in as_completed(futures):
                r = fut.result()
                results.append(r)
                bar.update(1)
                if r.status == "failed":
                    n_failed += 1
                    bar.set_postfix_str(f"{n_failed} failed", refresh=False)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            bar.close()

    results.sort(key=lambda r: r.line)
    report = DownloadReport(str(out), results, urls)
    write_report(report)
    return report


def write_report(report: DownloadReport) -> None:
    out = Path(report.out_dir)
    write_json(out / REPORT_JSON, report.to_dict())
    lines = ["attribute\turl\treason"]
    for r in report.failed:
        lines.append(f"{r.attribute}\t{r.url}\t{_one_line(r.reason)}")
    write_text(out / REPORT_TSV, "\n".join(lines) + "\n")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def failure_reasons(results: Iterable[DownloadResult]) -> dict[str, int]:
    """Failures grouped by a short reason (HTTP status or first words), most common first."""
    counts: dict[str, int] = {}
    for r in results:
        if r.status != "failed":
            continue
        key = f"HTTP {r.http_status}" if r.http_status and r.http_status >= 400 else r.reason.split(" (")[0].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
