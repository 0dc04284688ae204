"""Image embeddings: batched extraction (PyTorch or ONNX Runtime engines) with a content-hash cache."""

from .cache import FeatureCache, configured_cache_dir, default_cache_dir
from .engines import Engine, OnnxEngine, TorchEngine, create_engine
from .extract import EmbeddingResult, embed_paths

__all__ = ["FeatureCache", "configured_cache_dir", "default_cache_dir", "EmbeddingResult", "embed_paths", "Engine", "OnnxEngine", "TorchEngine", "create_engine"]
