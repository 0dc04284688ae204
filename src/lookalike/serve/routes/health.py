"""Service routes: the web page, health and Prometheus metrics."""

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..middleware import Metrics
from ..schemas import HealthOut
from ..service import Service
from ..similar import AnswerCache
from .common import errors as _errors

PAGE_CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"


def service_router(service: Service, metrics: Metrics, similar_cache: AnswerCache, page: str) -> APIRouter:
    router = APIRouter(tags=["service"])

    @router.get("/", include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @router.get("/healthz", response_model=HealthOut, responses=_errors(503))
    async def healthz() -> HealthOut:
        """Liveness and readiness: the index answers and the model is loaded."""
        stats = await service.on_index(service.stats)
        return HealthOut(status="ok", images=stats["images"], generation=stats["generation"], model=service.rankers[0].name)

    @router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests, errors and latency per route, model jobs running, catalog size, /similar answer cache."""
        metrics.model_jobs.set(service.jobs_running)
        metrics.catalog_images.set(sum(service.index.attributes.values()))
        metrics.similar_cache_bytes.set(similar_cache.held_bytes)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
