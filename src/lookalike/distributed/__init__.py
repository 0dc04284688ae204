"""Scale-out on Ray: featurize and index millions of images with the same model and the same outputs.

Importing this package does not import Ray; only running the Ray pipeline does (`pip install 'lookalike[ray]'`).
"""

from .indexing import build_index_from_shards, featurize_and_index
from .pipeline import ModelSpec, connect, featurize_dir_ray, featurize_ray

__all__ = ["ModelSpec", "build_index_from_shards", "connect", "featurize_and_index", "featurize_dir_ray", "featurize_ray"]
