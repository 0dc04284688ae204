"""The FastAPI app: similarity search over an index as a REST API and a web page (routes in `routes/`).

Every expected failure is an ApiError, BadImageError or LookalikeError and is answered with a 4xx
JSON ErrorBody; a catch-all handler turns anything else into a bare 500 body (logged server side),
so no traceback ever reaches a client. Catalog images are served by id, never by path.
"""


import logging
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LookalikeError
from ..version import __version__
from .errors import ApiError, error_response, expected_error_response
from .middleware import HeadAsGet, Metrics, RequestGuard
from .routes.catalog import catalog_router
from .routes.health import service_router
from .routes.search import search_router
from .service import Service
from .similar import PATH as SIMILAR_PATH
from .similar import SimilarAnswers, SimilarLane

log = logging.getLogger("lookalike.serve")
STATIC = Path(__file__).with_name("static")
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable", 413: "content_too_large", 415: "unsupported_media_type"}


def create_app(service: Service) -> FastAPI:
    """The app over a ready Service (which the caller closes when the app is done)."""
    settings = service.settings
    metrics = Metrics()
    app = FastAPI(
        title="lookalike",
        version=__version__,
        description="Search a catalog of images for look-alikes, ranked by a learned, calibrated similarity. The web page is at /.",
        # FastAPI's own /docs and /redoc load their scripts from a CDN, blank on a server without internet
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    answers = SimilarAnswers(service, metrics.similar_lookups)
    searches = search_router(service, answers)
    similar_route = next(r for r in searches.routes if r.path == SIMILAR_PATH)
    app.add_middleware(SimilarLane, answers=answers, route=similar_route, max_top=settings.max_top)
    app.add_middleware(RequestGuard, max_body=settings.max_upload_bytes, stall_s=settings.timeout_s, deadline_s=settings.upload_deadline_s)
    app.add_middleware(metrics.middleware)
    app.add_middleware(HeadAsGet)
    _install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _serve_api_docs(app)
    app.include_router(service_router(service, metrics, answers.cache, (STATIC / "index.html").read_text()))
    app.include_router(searches)
    app.include_router(catalog_router(service))
    return app


def _serve_api_docs(app: FastAPI) -> None:
    """/docs: Swagger UI from the fastapi-swagger package's copy, served by the app itself."""
    app.mount("/docs-assets", StaticFiles(directory=str(files("fastapi_swagger") / "resources")), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def api_docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )


def _install_error_handlers(app: FastAPI) -> None:
    async def expected(_: Request, e: ApiError | LookalikeError) -> JSONResponse:
        return expected_error_response(e)

    for kind in (ApiError, LookalikeError):  # a BadImageError finds the LookalikeError handler through its class
        app.add_exception_handler(kind, expected)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_request", "; ".join(problems) or "the request is not valid")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, STATUS_CODES.get(e.status_code, "error"), str(e.detail), e.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "the service failed to answer this request; the error has been logged on the server")
