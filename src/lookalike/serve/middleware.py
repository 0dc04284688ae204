"""ASGI layers around the app: request limits (body size, upload stalls, security headers) and Prometheus metrics."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class _Refused(Exception):
    """Raised inside the app's body read to stop it; the middleware answers instead."""


class RequestGuard:
    """Refuses bodies over `max_body` bytes (413), uploads that stall longer than `stall_s` or take longer than `deadline_s` in all (408), in JSON.

    The Content-Length is checked before anything is read; a chunked or lying body is counted as it
    arrives and cut off at the cap, so a client can never make the service buffer more than the cap.
    The deadline stops a body trickled just fast enough to dodge the stall limit.
    """

    def __init__(self, app: ASGIApp, max_body: int, stall_s: float, deadline_s: float = float("inf")):
        self.app = app
        self.max_body = max_body
        self.stall_s = stall_s
        self.deadline_s = deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal: ApiError | None = None
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            refusal = self._too_large() if length.isdigit() else ApiError(400, "bad_request", "the Content-Length header is not a number")
            await self._answer(refusal, scope, send)
            return
        received = 0
        body_done = False
        started = False
        deadline = time.monotonic() + self.deadline_s

        async def guarded_receive() -> Message:
            nonlocal received, body_done, refusal
            if body_done:
                return await receive()
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(min(self.stall_s, left), 0))
            except TimeoutError:
                if left <= self.stall_s:
                    refusal = ApiError(408, "request_timeout", f"the upload took longer than {self.deadline_s:g} s in all; send it again over a faster connection")
                else:
                    refusal = ApiError(408, "request_timeout", f"the upload stalled for more than {self.stall_s:g} s; send the request again")
                raise _Refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    refusal = self._too_large()
                    raise _Refused
                body_done = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:
                return  # the app's own answer to the cut-off body is replaced by ours
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not started:
            await self._answer(refusal, scope, send)

    def _too_large(self) -> ApiError:
        mb = self.max_body / (1024 * 1024)
        return ApiError(413, "content_too_large", f"the request is larger than the {mb:g} MB upload limit; send a smaller image")

    @staticmethod
    async def _answer(error: ApiError, scope: Scope, send: Send) -> None:
        response = JSONResponse(error.body(), error.status, {**error.headers, "connection": "close"})
        response.raw_headers.extend(SECURITY_HEADERS)

        async def no_body() -> Message:
            return {"type": "http.disconnect"}

        await response(scope, no_body, send)


class HeadAsGet:
    """Answers HEAD as GET, headers only: uptime monitors probe with HEAD, and FastAPI's GET routes refuse it (405)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class Metrics:
    """Request counts, error counts and a latency histogram per route template, in Prometheus text format."""

    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ["method", "route", "status"]
        self.requests = Counter("lookalike_http_requests", "HTTP requests answered.", labels, registry=self.registry)
        self.errors = Counter("lookalike_http_errors", "HTTP requests answered with a 4xx or 5xx status.", labels, registry=self.registry)
        self.latency = Histogram(
            "lookalike_http_request_duration_seconds",
            "Time from request to the end of the response.",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.in_progress = Gauge("lookalike_http_requests_in_progress", "Requests being answered now.", registry=self.registry)
        self.model_jobs = Gauge("lookalike_model_jobs_running", "Embedding and thumbnail jobs running now.", registry=self.registry)
        self.catalog_images = Gauge("lookalike_catalog_images", "Images in the catalog.", registry=self.registry)
        self.similar_lookups = Counter("lookalike_similar_cache_lookups", "GET /images/{id}/similar answers found in the answer cache (hit) or searched (miss).", ["result"], registry=self.registry)
        self.similar_cache_bytes = Gauge("lookalike_similar_cache_bytes", "JSON bytes of /similar answers held in the answer cache.", registry=self.registry)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def measured(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = 500
            start = time.perf_counter()

            async def watch(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            self.in_progress.inc()
            try:
                await app(scope, receive, watch)
            finally:
                self.in_progress.dec()
                route = getattr(scope.get("route"), "path", "<unmatched>")
                self.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
                self.requests.labels(scope["method"], route, str(status)).inc()
                if status >= 400:
                    self.errors.labels(scope["method"], route, str(status)).inc()

        return measured
