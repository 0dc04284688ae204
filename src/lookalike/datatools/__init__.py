"""Bring your own data: download a URL list, build one with an image search API, remove duplicates, combine rankers."""

from .dedup import Leak, find_duplicates, find_leaks, quarantine
from .download import download, read_url_list
from .fusion import combine_score_files, fuse_probabilities
from .scrape import BingImageSearch, ImageHit, SearchProvider, scrape, synthesize_queries, write_url_list

__all__ = [
    "BingImageSearch",
    "ImageHit",
    "Leak",
    "SearchProvider",
    "combine_score_files",
    "download",
    "find_duplicates",
    "find_leaks",
    "fuse_probabilities",
    "quarantine",
    "read_url_list",
    "scrape",
    "synthesize_queries",
    "write_url_list",
]
