"""The one shape of a search answer: `lookalike retrieve --json`, `lookalike index search --json` and REST /search.

Distances are the model's learned distance (0 for the same image, never negative, lower = more alike) or the
index's plain one; probabilities are the calibrated P(same attribute) in [0, 1]. Tables show them the same way
everywhere: `format_distance` and `format_probability`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from pydantic import BaseModel, Field


@dataclass(frozen=True)
class Match:
    """One image found for a query: its catalog id (None outside a catalog), path, attribute, distance and P(same)."""

    id: int | None
    path: str
    attribute: str | None
    distance: float
    probability: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def shown_distance(d: float) -> float:
    """A distance as users see it: float rounding of a 0 distance (or -0.0) is 0, never a negative number."""
    return float(d) if d > 0 else 0.0


def format_distance(d: float) -> str:
    return f"{shown_distance(d):.4f}"


def format_probability(p: float | None) -> str:
    return "-" if p is None else f"{p:.1%}"


class MatchOut(BaseModel):
    id: int | None = Field(description="Catalog id (fetch the picture with GET /images/{id}); null for a gallery folder, which has no catalog.")
    name: str = Field(description="File name of the matching image (no folders).")
    path: str | None = Field(None, description="The matching file's full path: given by the CLI and the Python API, never by the service.")
    attribute: str | None
    distance: float = Field(ge=0, description="Distance to the query: 0 for the same image, lower means more alike.")
    probability: float | None = Field(ge=0, le=1, description="Calibrated probability that the image shares the query's attribute (null for an uncalibrated distance).")
    image_url: str | None = Field(None, description="Where the service serves the picture (null outside the service).")
    thumbnail_url: str | None = Field(None, description="Where the service serves a thumbnail (null outside the service).")

    @classmethod
    def from_match(cls, m: dict, with_path: bool = False) -> "MatchOut":
        """A match as `index.search.Match.to_dict()` or the service's engine gives it; the path only when asked for."""
        return cls(**cls.fields(m, with_path))

    @staticmethod
    def fields(m: dict, with_path: bool = False) -> dict:
        """`from_match`'s fields as plain JSON values, in the model's order: what the service encodes without building the model."""
        image_id = m.get("id")
        probability = m["probability"]
        return {
            "id": image_id,
            "name": os.path.basename(m["path"]),
            "path": m["path"] if with_path else None,
            "attribute": m["attribute"],
            "distance": shown_distance(m["distance"]),
            "probability": None if probability is None else float(probability),
            "image_url": None if with_path or image_id is None else f"/images/{image_id}",
            "thumbnail_url": None if with_path or image_id is None else f"/images/{image_id}/thumbnail",
        }


class QueryOut(BaseModel):
    width: int = Field(description="Width in pixels as stored in the file (before any EXIF rotation).")
    height: int = Field(description="Height in pixels as stored in the file (before any EXIF rotation).")
    format: str | None = Field(description="Image format sniffed from the query's content; null for a search by catalog id.")
    id: int | None = Field(None, description="Catalog id when the query is a catalog image.")
    path: str | None = Field(None, description="The query file's path: given by the CLI, never by the service.")


class SearchOut(BaseModel):
    query: QueryOut
    attribute: str | None = Field(description="The attribute filter applied, if any.")
    min_probability: float | None = Field(None, ge=0, le=1, description="The probability floor applied, if any.")
    results: list[MatchOut]
    took_ms: float
