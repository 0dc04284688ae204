"""GET /images/{id}/similar, the service's hot path: its answer encoded once, straight to JSON bytes.

The answer has `SearchOut`'s shape and values (the OpenAPI schema documents it), but is encoded
with orjson from plain values rather than built as pydantic models and validated again by FastAPI:
that cost more CPU than the index search itself.
"""

from __future__ import annotations

import time

import orjson

from ..results import MatchOut
from .service import Service


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


class SimilarAnswers:
    """Answers to GET /images/{id}/similar as JSON bytes."""

    def __init__(self, service: Service):
        self.service = service

    async def body(self, image_id: int, top: int, attribute: str | None, min_probability: float | None) -> bytes:
        start = time.perf_counter()
        answer = await self.service.on_index(self._answer, image_id, top, attribute, min_probability)
        return finish(answer, (time.perf_counter() - start) * 1000)

    def _answer(self, index, image_id: int, top: int, attribute: str | None, min_probability: float | None) -> bytes:
        return encode_answer(image_id, attribute, min_probability, self.service.similar(index, image_id, top, attribute, min_probability))
