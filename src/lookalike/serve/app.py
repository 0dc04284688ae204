"""The FastAPI app: similarity search over an index as a REST API and a web page.

Every expected failure is an ApiError, BadImageError or LookalikeError and is answered with a 4xx
JSON ErrorBody; a catch-all handler turns anything else into a bare 500 body (logged server side),
so no traceback ever reaches a client. Catalog images are served by id, never by path.
"""


import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BadImageError, LookalikeError
from ..results import MatchOut, QueryOut, SearchOut
from ..version import __version__
from .engine import Engine, Upload, indexed_bytes
from .errors import ApiError, ErrorBody
from .middleware import Metrics, RequestGuard
from .schemas import AddOut, CatalogOut, CompareOut, HealthOut, RemoveOut
from .uploads import sniff_format

log = logging.getLogger("lookalike.serve")
STATIC = Path(__file__).with_name("static")
PAGE_CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"

#: Largest catalog id accepted in a URL (SQLite integers are 64-bit).
MAX_ID = 2**53
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable", 413: "content_too_large", 415: "unsupported_media_type"}


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorBody} for s in statuses}


def create_app(engine: Engine) -> FastAPI:
    """The app over a ready Engine (which the caller closes when the app is done)."""
    settings = engine.settings
    metrics = Metrics()
    app = FastAPI(
        title="lookalike",
        version=__version__,
        description="Search a catalog of images for look-alikes, ranked by a learned, calibrated similarity. The web page is at /.",
    )
    app.add_middleware(RequestGuard, max_body=settings.max_upload_bytes, stall_s=settings.timeout_s, deadline_s=settings.upload_deadline_s)
    app.add_middleware(metrics.middleware)
    _install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    page = (STATIC / "index.html").read_text()
    common = _errors(400, 408, 413, 422, 503)
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Required for catalog writes (--api-key or LOOKALIKE_API_KEY).")

    TopForm = Annotated[int, Form(ge=1, le=settings.max_top, description="How many matches to return.")]
    TopQuery = Annotated[int, Query(ge=1, le=settings.max_top, description="How many matches to return.")]
    AttributeForm = Annotated[str | None, Form(max_length=200, description="Only return catalog images with this attribute.")]
    AttributeQuery = Annotated[str | None, Query(max_length=200, description="Only return catalog images with this attribute.")]
    FloorForm = Annotated[float | None, Form(ge=0, le=1, description="Only return matches at least this likely to share the query's attribute.")]
    FloorQuery = Annotated[float | None, Query(ge=0, le=1, description="Only return matches at least this likely to share the query's attribute.")]
    ImageId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="Catalog id.")]

    async def read_upload(file: UploadFile, label: str) -> Upload:
        filename = _safe_filename(file.filename)
        name = f"{label} '{filename}'" if filename else label
        data = await file.read()
        return Upload(data, name, filename, *sniff_format(data, name))

    def require_writer(key: Annotated[str | None, Depends(key_header)]) -> None:
        if not settings.writes_enabled:
            raise ApiError(403, "writes_disabled", "catalog writes are disabled on this service; start it with --allow-writes and --api-key")
        if key is None or not secrets.compare_digest(key.encode(), settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "a valid X-API-Key header is required to change the catalog", {"WWW-Authenticate": "ApiKey"})

    @app.get("/", include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @app.post("/search", response_model=SearchOut, responses=_errors(400, 408, 413, 415, 422, 503), tags=["search"])
    async def search(
        image: Annotated[UploadFile, File(description="The query image (JPEG, PNG, WebP, BMP or TIFF).")],
        top: TopForm = 15,
        attribute: AttributeForm = None,
        min_probability: FloorForm = None,
    ) -> SearchOut:
        """Upload an image; get the most similar catalog images, nearest first."""
        start = time.perf_counter()
        upload = await read_upload(image, "image")
        vector = await engine.embed(upload)
        matches = await engine.on_index(engine.search, vector, top, attribute, [], min_probability)
        took = (time.perf_counter() - start) * 1000
        w, h = upload.size
        return SearchOut(
            query=QueryOut(width=w, height=h, format=upload.format), attribute=attribute, min_probability=min_probability,
            results=[MatchOut.from_match(m) for m in matches], took_ms=took,
        )

    @app.get("/images/{image_id}/similar", response_model=SearchOut, responses=_errors(404, 422, 503), tags=["search"])
    async def similar(image_id: ImageId, top: TopQuery = 15, attribute: AttributeQuery = None, min_probability: FloorQuery = None) -> SearchOut:
        """Search with a catalog image as the query (its stored vector; the image itself is left out)."""
        start = time.perf_counter()

        def by_id(index):
            vector = engine.vector_of(index, image_id)
            return engine.search(index, vector, top, attribute, [image_id], min_probability)

        matches = await engine.on_index(by_id)
        took = (time.perf_counter() - start) * 1000
        return SearchOut(
            query=QueryOut(width=0, height=0, format=None, id=image_id), attribute=attribute, min_probability=min_probability,
            results=[MatchOut.from_match(m) for m in matches], took_ms=took,
        )

    @app.post("/compare", response_model=CompareOut, responses=common | _errors(415), tags=["search"])
    async def compare(
        first: Annotated[UploadFile, File(description="First image.")],
        second: Annotated[UploadFile, File(description="Second image.")],
    ) -> CompareOut:
        """How alike two uploaded images are: distance and calibrated probability per ranker, and fused."""
        a = await read_upload(first, "first")
        b = await read_upload(second, "second")
        return CompareOut(**await engine.cpu(engine.compare, a, b))

    @app.get(
        "/images/{image_id}",
        response_class=Response,
        responses={200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}}} | _errors(404, 422, 503),
        tags=["catalog"],
    )
    async def image_file(image_id: ImageId) -> Response:
        """The catalog image itself, by id (only while the file holds the content that was indexed)."""
        entry = await engine.on_index(engine.entry, image_id)
        data = await engine.cpu(indexed_bytes, entry)
        return Response(data, media_type=engine.media_type(entry.path), headers={"Cache-Control": "private, max-age=3600"})

    @app.get(
        "/images/{image_id}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}} | _errors(404, 422, 503),
        tags=["catalog"],
    )
    async def thumbnail(image_id: ImageId) -> Response:
        """A JPEG thumbnail of the catalog image (made on first request, then cached in memory)."""
        entry = await engine.on_index(engine.entry, image_id)
        data = await engine.cpu(engine.thumbnail, entry)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/catalog", response_model=CatalogOut, tags=["catalog"])
    async def catalog() -> CatalogOut:
        """What the catalog holds: image count per attribute, the distance it ranks by, whether writes are on."""
        stats = await engine.on_index(engine.stats)
        return CatalogOut(**stats, writes_enabled=settings.writes_enabled, rankers=[r.name for r in engine.rankers])

    @app.post("/catalog", response_model=AddOut, responses=common | _errors(401, 403, 409, 415), tags=["catalog"])
    async def add_images(
        _: Annotated[None, Depends(require_writer)],
        images: Annotated[list[UploadFile], File(description="One or more images to add.")],
        attribute: Annotated[str | None, Form(pattern=r"^\w[\w .-]{0,63}$", description="Attribute of the new images (letters, digits, _ . - and spaces).")] = None,
    ) -> AddOut:
        """Add uploaded images to the catalog (needs --allow-writes and the X-API-Key header)."""
        if len(images) > settings.max_files:
            raise ApiError(413, "too_many_files", f"{len(images)} images in one request; send at most {settings.max_files} at a time")
        uploads = [await read_upload(f, f"images[{i}]") for i, f in enumerate(images)]
        vectors = await asyncio.gather(*(engine.embed(u) for u in uploads))
        added = await engine.on_index(engine.add, uploads, vectors, attribute)
        return AddOut(added=[{**a, "image_url": f"/images/{a['id']}", "thumbnail_url": f"/images/{a['id']}/thumbnail"} for a in added])

    @app.delete("/catalog/{image_id}", response_model=RemoveOut, responses=_errors(401, 403, 404, 409, 422, 503), tags=["catalog"])
    async def remove_image(image_id: ImageId, _: Annotated[None, Depends(require_writer)]) -> RemoveOut:
        """Remove an image from the catalog by id (needs --allow-writes and the X-API-Key header)."""
        await engine.on_index(engine.remove, image_id)
        return RemoveOut(removed=image_id)

    @app.get("/healthz", response_model=HealthOut, responses=_errors(503), tags=["service"])
    async def healthz() -> HealthOut:
        """Liveness and readiness: the index answers and the model is loaded."""
        stats = await engine.on_index(engine.stats)
        return HealthOut(status="ok", images=stats["images"], generation=stats["generation"], model=engine.rankers[0].name)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}, tags=["service"])
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests, errors and latency per route, model jobs running, catalog size."""
        metrics.model_jobs.set(engine.jobs_running)
        metrics.catalog_images.set(sum(engine.index.attributes.values()))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _safe_filename(filename: str | None) -> str:
    """The client's file name without folders or control characters, cut to 80 characters; only ever echoed, never used as a path."""
    return "".join(c for c in (filename or "").replace("\\", "/").rsplit("/", 1)[-1] if c.isprintable())[:80]


def _install_error_handlers(app: FastAPI) -> None:
    def reply(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(ErrorBody(error=error, detail=detail).model_dump(), status, headers)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return reply(e.status, e.error, e.detail, e.headers)

    @app.exception_handler(BadImageError)
    async def bad_image(_: Request, e: BadImageError) -> JSONResponse:
        return reply(422, "bad_image", f"{e.path}: {e.reason}")

    @app.exception_handler(LookalikeError)
    async def lookalike_error(_: Request, e: LookalikeError) -> JSONResponse:
        return reply(400, "bad_request", str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return reply(422, "invalid_request", "; ".join(problems) or "the request is not valid")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return reply(e.status_code, STATUS_CODES.get(e.status_code, "error"), str(e.detail), e.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return reply(500, "internal_error", "the service failed to answer this request; the error has been logged on the server")
