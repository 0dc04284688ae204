"""Datasets: scanning a folder-per-attribute tree, splitting it, and building comparative sets."""

from .dataset import Dataset, ImageRecord, dataset_from_files, scan_dataset
from .splits import ComparativeSet, Split, make_fit_split, make_split, verify_disjoint

__all__ = ["Dataset", "ImageRecord", "scan_dataset", "ComparativeSet", "Split", "make_fit_split", "make_split", "verify_disjoint", "dataset_from_files"]
