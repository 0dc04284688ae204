"""Image embeddings: batched extraction with a content-hash cache."""

from .cache import FeatureCache, default_cache_dir
from .extract import EmbeddingResult, embed_paths

__all__ = ["FeatureCache", "default_cache_dir", "EmbeddingResult", "embed_paths"]
