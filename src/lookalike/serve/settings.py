"""What the service is allowed to do, in one validated object shared by the CLI, the app and the tests."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..index.backends import IndexLocation


class ServeSettings(BaseModel):
    """Service limits and switches; every one has a safe default (loopback, read-only, 20 MB uploads)."""

    model_config = ConfigDict(frozen=True)

    index_dir: Path = Field(description="The index folder; with index_backend milvus, the collection's name.")
    index_backend: str = Field("faiss", description="faiss (a folder) or milvus (a collection in the Milvus at index_uri).")
    index_uri: str | None = Field(None, description="With index_backend milvus: a Milvus Lite file (*.db) or a server (http://host:19530).")
    run_dir: Path | None = Field(None, description="Model run to embed queries with; default: the run recorded in the index.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="Key required (header X-API-Key) for catalog writes.")
    allow_writes: bool = False
    upload_dir: Path | None = Field(None, description="Where images added through POST /catalog are stored; default: <INDEX_DIR>-uploads.")
    max_upload_mb: float = Field(20.0, gt=0, le=1024)
    max_concurrency: int = Field(2, ge=1, le=64, description="Model or image jobs (embedding, thumbnails) that run at once.")
    max_batch: int = Field(16, ge=1, le=256, description="Most uploads embedded together in one model call.")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="Longest an upload waits for others to share its model call (0 = only those already queued).")
    timeout_s: float = Field(30.0, gt=0, le=3600, description="Longest a request may wait for a model slot, run, or stall while uploading.")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="Longest a client may take to send a request's headers (slowloris); the connection is closed after.")
    upload_deadline_s: float = Field(120.0, gt=0, le=3600, description="Longest a client may take to send a whole request body, however steadily it trickles (408 after).")
    max_top: int = Field(100, ge=1, le=10_000)
    max_files: int = Field(32, ge=1, le=1000, description="Most images one POST /catalog request may add.")
    thumbnail_px: int = Field(256, ge=32, le=1024)
    thumbnail_cache: int = Field(2048, ge=0, description="Thumbnails kept in memory (LRU).")
    similar_cache_mb: float = Field(32.0, ge=0, le=65536, description="Memory for /images/{id}/similar answers of the current index version (LRU, JSON bytes; 0 = off).")

    @field_validator("api_key")
    @classmethod
    def _key_long_enough(cls, v: str | None) -> str | None:
        if not v:
            return None
        if len(v) < 16:
            raise ValueError("the API key must be at least 16 characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
        return v

    @property
    def index_location(self) -> IndexLocation:
        return IndexLocation.parse(self.index_dir, self.index_backend, self.index_uri)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def writes_enabled(self) -> bool:
        return self.allow_writes and self.api_key is not None

    def resolved_upload_dir(self) -> Path:
        if self.upload_dir is not None:
            return Path(self.upload_dir).expanduser().resolve()
        index = Path(self.index_dir).expanduser().resolve()
        return index.with_name(index.name + "-uploads")
