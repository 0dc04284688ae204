"""Ranking metrics: the tutorial's rank-of-the-positive, plus gallery recall@k and mAP."""

from .ranking import example_queries, gallery_metrics, negatives_above, positive_ranks, rank_summary

__all__ = ["example_queries", "gallery_metrics", "negatives_above", "positive_ranks", "rank_summary"]
