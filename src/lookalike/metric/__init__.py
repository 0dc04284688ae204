"""Distances between embeddings, fixed and learned, and the miner that feeds the learned one."""

from .distances import LABELS, Cosine, Distance, L1, L2, LearnedWeightedL2, RandomDistance, standard_distances
from .mining import HardNegativeMiner
from .pairs import pair_features, pairs_from_sets
from .ranker import WeightedL2Ranker

__all__ = [
    "LABELS", "Distance", "L1", "L2", "Cosine", "RandomDistance", "LearnedWeightedL2", "standard_distances",
    "HardNegativeMiner", "pair_features", "pairs_from_sets", "WeightedL2Ranker",
]
