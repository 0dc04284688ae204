"""Image embeddings: batched extraction (PyTorch or ONNX Runtime engines) with a content-hash cache."""

from .cache import FeatureCache, default_cache_dir
from .engines import Engine, OnnxEngine, TorchEngine, create_engine
from .extract import EmbeddingResult, embed_paths

__all__ = ["FeatureCache", "default_cache_dir", "EmbeddingResult", "embed_paths", "Engine", "OnnxEngine", "TorchEngine", "create_engine"]
