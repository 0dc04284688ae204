"""Response bodies: precise pydantic models, so the OpenAPI schema at /docs says exactly what comes back.

Search answers share one shape with the CLI: `lookalike.results`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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
