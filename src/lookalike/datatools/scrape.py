"""Build a URL list from an image search engine: queries synthesised as item x attribute, top N hits each.

The search engine is pluggable: anything with `search(query, count, offset) -> list[ImageHit]`
is a `SearchProvider`. `BingImageSearch` speaks the Bing Image Search v7 REST API (the one the
tutorial used); its endpoint can be overridden, e.g. for a compatible service or a test fake.
The result is a tutorial-format URL list (`attribute<TAB>url`) for `lookalike download`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, runtime_checkable

import httpx

from ..errors import LookalikeError
from ..fileio import write_text

@dataclass(frozen=True)
class ImageHit:
    """One image search result."""

    url: str  # the full-size image
    page_url: str = ""  # the web page showing it
    width: int | None = None
    height: int | None = None
    format: str = ""  # e.g. "jpeg", as the search engine reports it
    name: str = ""  # title or caption
    thumbnail_url: str = ""


@runtime_checkable
class SearchProvider(Protocol):
    """An image search engine. `search` returns at most `count` hits, starting at result `offset`."""

    name: str

    def search(self, query: str, count: int, offset: int = 0) -> list[ImageHit]: ...


class SearchError(LookalikeError):
    """The search service refused or failed a request."""


class BingImageSearch:
    """Bing Image Search API v7: GET {endpoint}?q=...&count=...&offset=... with the key in a header.

    The key comes from `key` or the BING_SEARCH_KEY environment variable, the endpoint from
    `endpoint`, BING_SEARCH_ENDPOINT, or the public default. Rate-limited answers (429) and
    server errors are retried with backoff; `min_interval` spaces requests (the free tier allowed
    3 per second).
    """

    name = "bing"
    DEFAULT_ENDPOINT = "https://api.bing.microsoft.com/v7.0/images/search"
    KEY_ENV = "BING_SEARCH_KEY"
    ENDPOINT_ENV = "BING_SEARCH_ENDPOINT"
    MAX_COUNT = 150  # the API's per-request maximum

    def __init__(
        self,
        key: str | None = None,
        endpoint: str | None = None,
        *,
        market: str | None = None,
        safe_search: str = "Moderate",
        timeout: float = 20.0,
        retries: int = 3,
        min_interval: float = 0.34,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        key = key if key is not None else os.environ.get(self.KEY_ENV, "")
        if not key.strip():
            raise LookalikeError(
                f"no Bing Image Search key: set the {self.KEY_ENV} environment variable to your subscription key "
                f"(e.g. export {self.KEY_ENV}=...), or only list the queries without searching",
                param="key",
            )
        if safe_search not in ("Off", "Moderate", "Strict"):
            raise LookalikeError(f"safe_search must be Off, Moderate or Strict, not {safe_search!r}")
        self.key = key.strip()
        self.endpoint = endpoint or os.environ.get(self.ENDPOINT_ENV) or self.DEFAULT_ENDPOINT
        self.market = market
        self.safe_search = safe_search
        self.retries = retries
        self.min_interval = min_interval
        self._sleep = sleep
        self._last_request = 0.0
        #: the API's `nextOffset` from the latest answer: where the next page starts (it may skip results it deduplicated)
        self.last_next_offset: int | None = None
        self._client = client or httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "BingImageSearch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def search(self, query: str, count: int, offset: int = 0) -> list[ImageHit]:
        params: dict[str, str | int] = {"q": query, "count": max(1, min(count, self.MAX_COUNT)), "offset": max(0, offset), "safeSearch": self.safe_search}
        if self.market:
            params["mkt"] = self.market
        payload = self._get(params)
        hits = []
        for item in payload.get("value") or []:
            url = item.get("contentUrl") if isinstance(item, dict) else None
            if not isinstance(url, str) or not url:
                continue
            hits.append(
                ImageHit(
                    url=url,
                    page_url=item.get("hostPageUrl") or "",
                    width=_int_or_none(item.get("width")),
                    height=_int_or_none(item.get("height")),
                    format=item.get("encodingFormat") or "",
                    name=item.get("name") or "",
                    thumbnail_url=item.get("thumbnailUrl") or "",
                )
            )
        self.last_next_offset = _int_or_none(payload.get("nextOffset"))
        return hits[:count]

    def _get(self, params: dict) -> dict:
        for attempt in range(self.retries + 1):
            wait = self.min_interval - (time.monotonic() - self._last_request)
            if wait > 0:
                self._sleep(wait)
            self._last_request = time.monotonic()
            try:
                response = self._client.get(self.endpoint, params=params, headers={"Ocp-Apim-Subscription-Key": self.key, "Accept": "application/json"})
            except httpx.HTTPError as e:
                if attempt == self.retries:
                    raise SearchError(f"cannot reach the search API at {self.endpoint} ({type(e).__name__}: {e})") from None
                self._sleep(min(30.0, 2.0**attempt))
                continue
            if response.status_code == 200:
                try:
                    payload = response.json()
                except ValueError:
                    payload = None
                if not isinstance(payload, dict):
                    raise SearchError(f"the search API at {self.endpoint} did not answer with a JSON object; is the endpoint right?")
                return payload
            message = _error_message(response)
            if response.status_code in (429, 500, 502, 503, 504) and attempt < self.retries:
                retry_after = response.headers.get("Retry-After", "")
                self._sleep(min(60.0, float(retry_after)) if retry_after.replace(".", "", 1).isdigit() else min(30.0, 2.0**attempt))
                continue
            if response.status_code in (401, 403):
                raise SearchError(f"the search API refused the key in {self.KEY_ENV} (HTTP {response.status_code}: {message}); check the key and its endpoint")
            raise SearchError(f"the search API answered HTTP {response.status_code}: {message}")
        raise SearchError("unreachable")  # pragma: no cover


def _error_message(response: httpx.Response) -> str:
    """The message inside a Bing error body ({"errors": [...]} or Azure's {"error": {...}}), else the reason phrase."""
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "error"
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("message") or errors[0].get("code") or "error")
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error.get("code") or "error")
    return response.reason_phrase or "error"


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- queries and the scrape itself


@dataclass(frozen=True)
class Query:
    attribute: str
    text: str


def synthesize_queries(attributes: Iterable[str], items: Iterable[str] = (), template: str = "{item} {attribute}") -> list[Query]:
    """Every item x attribute combination as a query ("tshirt striped"); just the attributes when no items are given."""
    attributes = _unique(a.strip() for a in attributes if a.strip())
    items = _unique(i.strip() for i in items if i.strip())
    if not attributes:
        raise LookalikeError("give at least one attribute to search for, e.g. striped, dotted, leopard", param="attributes")
    if "{attribute}" not in template:
        raise LookalikeError("the query template must contain {attribute} (and usually {item}), e.g. '{item} {attribute}'")
    if not items:
        return [Query(a, " ".join(template.replace("{item}", "").split()).format(attribute=a)) for a in attributes]
    return [Query(a, template.format(item=i, attribute=a)) for a in attributes for i in items]


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


@dataclass
class ScrapeResult:
    rows: list[tuple[str, str]]  # (attribute, url), in the order found
    per_query: dict[str, int] = field(default_factory=dict)  # query text -> hits returned
    ambiguous: list[dict] = field(default_factory=list)  # URLs found under more than one attribute, left out
    repeated: int = 0  # hits whose URL was already listed for the same attribute


def scrape(provider: SearchProvider, queries: list[Query], per_query: int = 50, progress: Callable[[Query, int], None] | None = None) -> ScrapeResult:
    """Ask `provider` for the top `per_query` hits of each query; keep each URL once.

    A URL found for two different attributes is left out (an image must belong to exactly one
    attribute) and listed in `ambiguous`.
    """
    if per_query < 1:
        raise LookalikeError("per_query must be at least 1")
    first: dict[str, str] = {}  # url -> attribute it was first found for (dicts keep insertion order)
    attributes_of: dict[str, set[str]] = {}
    result = ScrapeResult(rows=[])
    for q in queries:
        hits = _top_hits(provider, q.text, per_query)
        result.per_query[q.text] = len(hits)
        for hit in hits:
            url = hit.url.strip()
            if not url.lower().startswith(("http://", "https://")) or any(c.isspace() for c in url):
                continue
            if url not in first:
                first[url] = q.attribute
                attributes_of[url] = {q.attribute}
            elif q.attribute in attributes_of[url]:
                result.repeated += 1
            else:
                attributes_of[url].add(q.attribute)
        if progress:
            progress(q, len(hits))
    for url, attribute in first.items():
        if len(attributes_of[url]) == 1:
            result.rows.append((attribute, url))
        else:
            result.ambiguous.append({"url": url, "attributes": sorted(attributes_of[url])})
    return result


def _top_hits(provider: SearchProvider, query: str, wanted: int) -> list[ImageHit]:
    hits: list[ImageHit] = []
    offset = 0
    page_limit = getattr(provider, "MAX_COUNT", wanted)
    while len(hits) < wanted:
        page = provider.search(query, min(wanted - len(hits), page_limit), offset)
        if not page:
            break
        hits.extend(page)
        next_offset = getattr(provider, "last_next_offset", None)
        offset = next_offset if next_offset and next_offset > offset else offset + len(page)
    return hits[:wanted]


def write_url_list(rows: Iterable[tuple[str, str]], path: str | os.PathLike) -> Path:
    """Write `attribute<TAB>url` lines atomically."""
    path = Path(path)
    write_text(path, "".join(f"{a}\t{u}\n" for a, u in rows))
    return path
