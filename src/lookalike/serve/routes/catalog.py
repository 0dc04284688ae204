"""Catalog routes: images and thumbnails by id, what the catalog holds, and (with a key) adding and removing images."""

import asyncio
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import Response
from fastapi.security import APIKeyHeader

from ..errors import ApiError
from ..schemas import AddOut, CatalogOut, RemoveOut
from ..service import Service, indexed_bytes
from .common import COMMON_ERRORS as common
from .common import ImageId, read_upload
from .common import errors as _errors


def catalog_router(service: Service) -> APIRouter:
    router = APIRouter(tags=["catalog"])
    settings = service.settings
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Required for catalog writes (--api-key or LOOKALIKE_API_KEY).")

    def require_writer(key: Annotated[str | None, Depends(key_header)]) -> None:
        if not settings.writes_enabled:
            raise ApiError(403, "writes_disabled", "catalog writes are disabled on this service; start it with --allow-writes and --api-key")
        if key is None or not secrets.compare_digest(key.encode(), settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "a valid X-API-Key header is required to change the catalog", {"WWW-Authenticate": "ApiKey"})

    @router.get(
        "/images/{image_id}",
        response_class=Response,
        responses={200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}}} | _errors(404, 422, 503),
    )
    async def image_file(image_id: ImageId) -> Response:
        """The catalog image itself, by id (only while the file holds the content that was indexed)."""
        entry = await service.on_index(service.entry, image_id)
        data = await service.cpu(indexed_bytes, entry)
        return Response(data, media_type=service.media_type(entry.path), headers={"Cache-Control": "private, max-age=3600"})

    @router.get(
        "/images/{image_id}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}} | _errors(404, 422, 503),
    )
    async def thumbnail(image_id: ImageId) -> Response:
        """A JPEG thumbnail of the catalog image (made on first request, then cached in memory)."""
        entry = await service.on_index(service.entry, image_id)
        data = await service.cpu(service.thumbnail, entry)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/catalog", response_model=CatalogOut)
    async def catalog() -> CatalogOut:
        """What the catalog holds: image count per attribute, the distance it ranks by, whether writes are on."""
        stats = await service.on_index(service.stats)
        return CatalogOut(**stats, writes_enabled=settings.writes_enabled, rankers=[r.name for r in service.rankers])

    @router.post("/catalog", response_model=AddOut, responses=common | _errors(401, 403, 409, 415))
    async def add_images(
        _: Annotated[None, Depends(require_writer)],
        images: Annotated[list[UploadFile], File(description="One or more images to add.")],
        attribute: Annotated[str | None, Form(pattern=r"^\w[\w .-]{0,63}$", description="Attribute of the new images (letters, digits, _ . - and spaces).")] = None,
    ) -> AddOut:
        """Add uploaded images to the catalog (needs --allow-writes and the X-API-Key header)."""
        if len(images) > settings.max_files:
            raise ApiError(413, "too_many_files", f"{len(images)} images in one request; send at most {settings.max_files} at a time")
        uploads = [await read_upload(f, f"images[{i}]") for i, f in enumerate(images)]
        vectors = await asyncio.gather(*(service.embed(u) for u in uploads))
        added = await service.on_index(service.add, uploads, vectors, attribute)
        return AddOut(added=[{**a, "image_url": f"/images/{a['id']}", "thumbnail_url": f"/images/{a['id']}/thumbnail"} for a in added])

    @router.delete("/catalog/{image_id}", response_model=RemoveOut, responses=_errors(401, 403, 404, 409, 422, 503))
    async def remove_image(image_id: ImageId, _: Annotated[None, Depends(require_writer)]) -> RemoveOut:
        """Remove an image from the catalog by id (needs --allow-writes and the X-API-Key header)."""
        await service.on_index(service.remove, image_id)
        return RemoveOut(removed=image_id)

    return router
