"""GET /images/{id}/similar, the service's hot path: its answer encoded once, straight to JSON bytes.

The answer has `SearchOut`'s shape and values (the OpenAPI schema documents it), but is encoded
with orjson from plain values rather than built as pydantic models and validated again by FastAPI:
that cost more CPU than the index search itself.

Catalog pages ask for the look-alikes of the same ids over and over, so `AnswerCache` keeps the
encoded answers (LRU, bounded in bytes by --similar-cache-mb) of one index version: its key is the
id and every query parameter, and the version the index thread searched. A FAISS index's version
(its manifest's inode and mtime, which every committed add, remove or compact changes) is read on
the event loop with one stat, so a hit needs no trip to the index thread; the cache serves nothing
the service's own reload of the index would not (the same version decides both).

`SimilarLane` answers a well-formed request before FastAPI routes it and validates its parameters
one by one, which cost as much again: it takes only requests whose id and query parameters are
written plainly (`/images/12/similar?top=20&attribute=striped&min_probability=0.5`, each at most
once) and within the route's bounds, and hands anything else to the route, whose validation gives
the 422 answers. Both give the same bytes from `SimilarAnswers`.
"""

from __future__ import annotations

import re
import threading
import time
from urllib.parse import parse_qsl

import orjson
from cachetools import LRUCache
from prometheus_client import Counter
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import LookalikeError
from ..results import MatchOut
from .errors import ApiError, expected_error_response
from .routes.common import DEFAULT_TOP, MAX_ATTRIBUTE, MAX_ID
from .service import Service

PATH = "/images/{image_id}/similar"
_PATH = re.compile(r"/images/(0|[1-9][0-9]{0,15})/similar")
_TOP = re.compile(r"[1-9][0-9]{0,5}")
_FLOOR = re.compile(r"[01](\.[0-9]{1,20})?")
_JSON = (b"content-type", b"application/json")


def encode_answer(image_id: int, attribute: str | None, min_probability: float | None, matches: list[dict]) -> bytes:
    """The JSON of a /similar answer up to, not including, its `took_ms` field (which `finish` appends) and closing brace."""
    body = {
        "query": {"width": 0, "height": 0, "format": None, "id": image_id, "path": None},
        "attribute": attribute,
        "min_probability": min_probability,
        "results": [MatchOut.fields(m) for m in matches],
    }
    return orjson.dumps(body)[:-1]


def finish(answer: bytes, took_ms: float) -> bytes:
    """A whole /similar body: an encoded answer and the milliseconds this request took."""
    return answer + b',"took_ms":' + orjson.dumps(took_ms) + b"}"


class AnswerCache:
    """Encoded answers of one index version, least recently used dropped beyond `max_bytes`; a new version empties it. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._answers: LRUCache[tuple, bytes] = LRUCache(max(max_bytes, 1), getsizeof=len)
        self._version: tuple | None = None
        self._lock = threading.Lock()

    def get(self, version: tuple | None, key: tuple) -> bytes | None:
        if version is None or not self.max_bytes:
            return None
        with self._lock:
            return self._answers.get(key) if version == self._version else None

    def put(self, version: tuple | None, key: tuple, answer: bytes) -> None:
        if version is None or len(answer) > self.max_bytes:
            return
        with self._lock:
            if version != self._version:
                self._answers.clear()
                self._version = version
            self._answers[key] = answer

    @property
    def held_bytes(self) -> int:
        return int(self._answers.currsize)


class SimilarAnswers:
    """Answers to GET /images/{id}/similar as JSON bytes, from the cache or the index thread; `lookups` counts hits and misses."""

    def __init__(self, service: Service, lookups: Counter):
        self.service = service
        self.cache = AnswerCache(int(service.settings.similar_cache_mb * 1024 * 1024))
        self._hit = lookups.labels("hit")
        self._miss = lookups.labels("miss")

    async def body(self, image_id: int, top: int, attribute: str | None, min_probability: float | None) -> bytes:
        start = time.perf_counter()
        key = (image_id, top, attribute, min_probability)
        answer = self.cache.get(self.service.index.version_now(), key)
        if answer is None:
            answer = await self.service.on_index(self._answer, key)
        else:
            self._hit.inc()
        return finish(answer, (time.perf_counter() - start) * 1000)

    def _answer(self, index, key: tuple) -> bytes:
        """On the index thread: the answer for the version it searches (looked up again: a Milvus index's version is only known here)."""
        version = self.service.index.stamp
        answer = self.cache.get(version, key)
        if answer is not None:
            self._hit.inc()
            return answer
        self._miss.inc()
        image_id, top, attribute, min_probability = key
        answer = encode_answer(image_id, attribute, min_probability, self.service.similar(index, image_id, top, attribute, min_probability))
        self.cache.put(version, key, answer)
        return answer


def plain_query(query_string: bytes, max_top: int) -> tuple[int, str | None, float | None] | None:
    """top, attribute and min_probability of a plainly written query within bounds; None for any other query (the route decides)."""
    top, attribute, floor = DEFAULT_TOP, None, None
    seen = set()
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):  # as Starlette reads it
        if name in seen or not value:
            return None
        seen.add(name)
        if name == "top" and _TOP.fullmatch(value) and int(value) <= max_top:
            top = int(value)
        elif name == "attribute" and len(value) <= MAX_ATTRIBUTE:
            attribute = value
        elif name == "min_probability" and _FLOOR.fullmatch(value) and float(value) <= 1:
            floor = float(value)
        else:
            return None
    return top, attribute, floor


class SimilarLane:
    """Pure ASGI in front of the router: answers plainly written GET /images/{id}/similar requests, passes on everything else.

    It sits inside the metrics and the request guard (security headers, body limits), and records
    the request under the route's template as the router would.
    """

    def __init__(self, app: ASGIApp, answers: SimilarAnswers, route: BaseRoute, max_top: int):
        self.app = app
        self.answers = answers
        self.route = route
        self.max_top = max_top

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "GET" else None
        params = plain_query(scope["query_string"], self.max_top) if found else None
        if params is None or int(found[1]) > MAX_ID:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        try:
            body = await self.answers.body(int(found[1]), *params)
        except (ApiError, LookalikeError) as e:
            await expected_error_response(e)(scope, receive, send)
        else:
            await send({"type": "http.response.start", "status": 200, "headers": [_JSON, (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})
