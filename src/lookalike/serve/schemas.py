"""Response bodies: precise pydantic models, so the OpenAPI schema at /docs says exactly what comes back."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field


class MatchOut(BaseModel):
    id: int = Field(description="Catalog id; fetch the picture with GET /images/{id}.")
    name: str = Field(description="File name of the catalog image (no folders).")
    path: str | None = Field(None, description="The catalog file's full path: given by the CLI and the Python API, never by the service.")
    attribute: str | None
    distance: float = Field(description="The index's distance to the query; lower means more alike.")
    probability: float | None = Field(ge=0, le=1, description="Calibrated probability that the image shares the query's attribute (null for an uncalibrated distance).")
    image_url: str
    thumbnail_url: str

    @classmethod
    def from_match(cls, m: dict, with_path: bool = False) -> "MatchOut":
        """A match as `index.search.Match.to_dict()` or the service's engine gives it; the path only when asked for."""
        return cls(
            id=m["id"],
            name=os.path.basename(m["path"]),
            path=m["path"] if with_path else None,
            attribute=m["attribute"],
            distance=m["distance"],
            probability=m["probability"],
            image_url=f"/images/{m['id']}",
            thumbnail_url=f"/images/{m['id']}/thumbnail",
        )


class QueryOut(BaseModel):
    width: int
    height: int
    format: str | None = Field(description="Image format sniffed from the upload's content; null for a search by catalog id.")
    id: int | None = Field(None, description="Catalog id when the query is a catalog image.")
    path: str | None = Field(None, description="The query file's path: given by the CLI, never by the service.")


class SearchOut(BaseModel):
    query: QueryOut
    attribute: str | None = Field(description="The attribute filter applied, if any.")
    results: list[MatchOut]
    took_ms: float


class RankerScoreOut(BaseModel):
    name: str
    distance: float
    probability: float = Field(ge=0, le=1)


class CompareOut(BaseModel):
    distance: float = Field(description="Learned distance of the index's ranker; lower means more alike.")
    probability: float = Field(ge=0, le=1, description="Its calibrated probability that the two images share the attribute.")
    rankers: list[RankerScoreOut] = Field(description="Every loaded ranker's distance and probability (one per attribute family).")
    fused_probability: float = Field(ge=0, le=1, description="Average of the rankers' calibrated probabilities.")


class CatalogOut(BaseModel):
    images: int
    attributes: dict[str, int]
    distance: str
    generation: int
    writes_enabled: bool
    rankers: list[str]


class AddedOut(BaseModel):
    id: int
    name: str = Field(description="The uploaded file's name, as sent.")
    attribute: str | None
    already_present: bool = Field(description="True when identical content was already catalogued (nothing added).")
    image_url: str
    thumbnail_url: str


class AddOut(BaseModel):
    added: list[AddedOut]


class RemoveOut(BaseModel):
    removed: int


class HealthOut(BaseModel):
    status: Literal["ok"]
    images: int
    generation: int
    model: str
