"""What the routes share: the request parameters (bounded by the service's settings), upload reading, error docs."""

from typing import Annotated

from fastapi import File, Form, Query, UploadFile
from fastapi import Path as PathParam

from ..errors import ErrorBody
from ..service import Upload
from ..uploads import sniff_format

#: Largest catalog id accepted in a URL (SQLite integers are 64-bit).
MAX_ID = 2**53
#: Matches a search returns when `top` is not given.
DEFAULT_TOP = 15
#: Longest attribute filter accepted, in characters.
MAX_ATTRIBUTE = 200
ImageId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="Catalog id.")]
AttributeForm = Annotated[str | None, Form(max_length=MAX_ATTRIBUTE, description="Only return catalog images with this attribute.")]
AttributeQuery = Annotated[str | None, Query(max_length=MAX_ATTRIBUTE, description="Only return catalog images with this attribute.")]
FloorForm = Annotated[float | None, Form(ge=0, le=1, description="Only return matches at least this likely to share the query's attribute.")]
FloorQuery = Annotated[float | None, Query(ge=0, le=1, description="Only return matches at least this likely to share the query's attribute.")]
ImageFile = Annotated[UploadFile, File(description="The query image (JPEG, PNG, WebP, BMP, TIFF or HEIC).")]


def errors(*statuses: int) -> dict:
    """OpenAPI documentation of the error answers a route can give."""
    return {s: {"model": ErrorBody} for s in statuses}


COMMON_ERRORS = errors(400, 408, 413, 422, 503)


async def read_upload(file: UploadFile, label: str) -> Upload:
    """The uploaded bytes with a printable name for messages and the format sniffed from the content."""
    filename = safe_filename(file.filename)
    name = f"{label} '{filename}'" if filename else label
    data = await file.read()
    return Upload(data, name, filename, *sniff_format(data, name))


def safe_filename(filename: str | None) -> str:
    """The client's file name without folders or control characters, cut to 80 characters; only ever echoed, never used as a path."""
    return "".join(c for c in (filename or "").replace("\\", "/").rsplit("/", 1)[-1] if c.isprintable())[:80]
