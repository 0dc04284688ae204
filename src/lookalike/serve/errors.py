"""Errors the service answers with: a status, a short machine code and a sentence that says what was wrong."""

from __future__ import annotations

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from ..errors import BadImageError, LookalikeError


class ErrorBody(BaseModel):
    """Every 4xx (and the never-expected 5xx) answer has this body; no traceback is ever included."""

    error: str = Field(description="Short machine-readable code, e.g. 'unsupported_media_type'.")
    detail: str = Field(description="What was wrong and how to fix it.")


class ApiError(Exception):
    """An expected failure of one request; turned into a JSON ErrorBody by the app's handler."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorBody(error=self.error, detail=self.detail).model_dump()


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON answer of a failed request."""
    return JSONResponse(ErrorBody(error=error, detail=detail).model_dump(), status, headers)


def expected_error_response(e: ApiError | LookalikeError) -> JSONResponse:
    """The answer to an expected failure, the same whether the app's handlers or a pure-ASGI lane caught it."""
    if isinstance(e, ApiError):
        return error_response(e.status, e.error, e.detail, e.headers)
    if isinstance(e, BadImageError):
        return error_response(422, "bad_image", f"{e.path}: {e.reason}")
    return error_response(400, "bad_request", str(e))
