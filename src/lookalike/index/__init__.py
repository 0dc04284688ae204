"""Image catalog and fast similarity search: SQLite catalog + FAISS vectors, updatable, crash-safe."""

from ..images import scan_images
from ..results import Match
from .catalog import ImageEntry, NewImage
from .ingest import Embedder, IngestReport, ingest
from .metric import IndexMetric
from .search import search_vectors
from .store import ImageIndex

__all__ = ["Embedder", "ImageEntry", "ImageIndex", "IndexMetric", "IngestReport", "Match", "NewImage", "ingest", "scan_images", "search_vectors"]
