"""Ranking metrics: the tutorial's rank-of-the-positive, plus gallery recall@k and mAP."""

from .ranking import gallery_metrics, positive_ranks, rank_summary

__all__ = ["gallery_metrics", "positive_ranks", "rank_summary"]
