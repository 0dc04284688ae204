"""Search routes: by upload, by catalog id, and comparing two uploads."""

import time
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from ...results import MatchOut, QueryOut, SearchOut
from ..schemas import CompareOut
from ..service import Service
from ..similar import SimilarAnswers
from .common import COMMON_ERRORS as common
from .common import DEFAULT_TOP, AttributeForm, AttributeQuery, FloorForm, FloorQuery, ImageFile, ImageId, read_upload
from .common import errors as _errors


def search_router(service: Service, answers: SimilarAnswers) -> APIRouter:
    router = APIRouter(tags=["search"])
    TopForm = Annotated[int, Form(ge=1, le=service.settings.max_top, description="How many matches to return.")]
    TopQuery = Annotated[int, Query(ge=1, le=service.settings.max_top, description="How many matches to return.")]

    @router.post("/search", response_model=SearchOut, responses=_errors(400, 408, 413, 415, 422, 503))
    async def search(
        image: ImageFile,
        top: TopForm = DEFAULT_TOP,
        attribute: AttributeForm = None,
        min_probability: FloorForm = None,
    ) -> SearchOut:
        """Upload an image; get the most similar catalog images, nearest first."""
        start = time.perf_counter()
        upload = await read_upload(image, "image")
        vector = await service.embed(upload)
        matches = await service.on_index(service.search, vector, top, attribute, [], min_probability)
        took = (time.perf_counter() - start) * 1000
        w, h = upload.size
        return SearchOut(
            query=QueryOut(width=w, height=h, format=upload.format), attribute=attribute, min_probability=min_probability,
            results=[MatchOut.from_match(m) for m in matches], took_ms=took,
        )

    @router.get("/images/{image_id}/similar", response_model=SearchOut, responses=_errors(404, 422, 503))
    async def similar(image_id: ImageId, top: TopQuery = DEFAULT_TOP, attribute: AttributeQuery = None, min_probability: FloorQuery = None) -> Response:
        """Search with a catalog image as the query (its stored vector; the image itself is left out)."""
        # an empty attribute means all of them, as in POST /search's form
        return Response(await answers.body(image_id, top, attribute or None, min_probability), media_type="application/json")

    @router.post("/compare", response_model=CompareOut, responses=common | _errors(415))
    async def compare(
        first: Annotated[UploadFile, File(description="First image.")],
        second: Annotated[UploadFile, File(description="Second image.")],
    ) -> CompareOut:
        """How alike two uploaded images are: distance and calibrated probability per ranker, and fused."""
        a = await read_upload(first, "first")
        b = await read_upload(second, "second")
        return CompareOut(**await service.cpu(service.compare, a, b))

    return router
