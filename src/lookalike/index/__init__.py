"""Image catalog and fast similarity search: SQLite catalog + FAISS vectors, updatable, crash-safe."""

from .catalog import ImageEntry, NewImage
from .ingest import Embedder, IngestReport, ingest, scan_images
from .metric import IndexMetric
from ..results import Match
from .search import search_vectors
from .store import ImageIndex

__all__ = ["Embedder", "ImageEntry", "ImageIndex", "IndexMetric", "IngestReport", "Match", "NewImage", "ingest", "scan_images", "search_vectors"]
