"""Perceptual (difference) hashes of images and fast Hamming-distance search between them.

The low-level part of near-duplicate detection, shared by the dataset scan and split leak check
(`data/`) and by `lookalike dedup` (`datatools/dedup.py`). Hashes are `imagehash.dhash` (hash_size 16,
as the tutorial found best), packed into bytes; comparisons XOR 64-bit words block by block and count
the set bits with numpy, so thousands of images take seconds, not a Python loop over every pair.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import imagehash
import numpy as np

from .errors import BadImageError, LookalikeError
from .images import open_image
from .progress import tqdm

DEFAULT_HASH_SIZE = 16
#: decode JPEGs at about this size before hashing (dhash shrinks to hash_size+1 x hash_size anyway)
_DRAFT_SIZE = 256
#: bytes of XOR workspace per comparison block
_BLOCK_BYTES = 32 * 1024 * 1024


def default_max_distance(hash_size: int = DEFAULT_HASH_SIZE) -> int:
    """hash_size**2 / 16 bits (1/16 of the hash): 16 of 256 bits for hash_size 16.

    At that distance resized and re-encoded copies match, as do most crops of about 1% per side;
    on the tutorial's texture photos the closest pair of genuinely different images differs in 19.
    """
    return max(1, hash_size * hash_size // 16)


def dhash_bits(path: str | os.PathLike, hash_size: int = DEFAULT_HASH_SIZE) -> np.ndarray:
    """The packed dhash of one image file (uint8 array of hash_size**2 / 8 bytes); BadImageError if unreadable."""
    image = open_image(path, draft_size=_DRAFT_SIZE)
    return np.packbits(imagehash.dhash(image, hash_size=hash_size).hash.ravel())


def hash_images(
    paths: Sequence[str | os.PathLike], hash_size: int = DEFAULT_HASH_SIZE, *, skip_unreadable: bool = False, progress: bool = False, workers: int | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Packed dhashes of `paths`, one row each.

    Unreadable images raise BadImageError, or with `skip_unreadable` get an all-zero row and an
    entry {index: reason} in the returned dict (exclude those rows before comparing).
    """
    if hash_size < 2:
        raise LookalikeError(f"hash size must be at least 2, not {hash_size}")
    n_bytes = (hash_size * hash_size + 7) // 8
    out = np.zeros((len(paths), n_bytes), dtype=np.uint8)
    problems: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            out[i] = dhash_bits(paths[i], hash_size)
        except BadImageError as e:
            if not skip_unreadable:
                raise
            problems[i] = e.reason

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(tqdm(pool.map(one, range(len(paths))), total=len(paths), desc="Hashing images", unit="img", disable=not progress or not paths, leave=False))
    return out, problems


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    """Differing bits between two packed hashes."""
    return int(np.bitwise_count(np.bitwise_xor(a, b)).sum())


def featureless(hashes: np.ndarray) -> np.ndarray:
    """Which packed hashes have almost every bit equal (all but 1/16 of them): a mask, one entry per row.

    A difference hash records where brightness rises from one pixel to the next, so a plain or smoothly
    lit image hashes to (nearly) all zeros whatever its colour: a red and a navy swatch would be twins.
    """
    set_bits = np.unpackbits(np.atleast_2d(hashes), axis=1).sum(1)
    n_bits = hashes.shape[-1] * 8
    margin = max(1, n_bits // 16)
    return (set_bits <= margin) | (set_bits >= n_bits - margin)


def near_pairs(a: np.ndarray, b: np.ndarray | None = None, max_distance: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, distance) with Hamming distance between a[i] and b[j] at most `max_distance`.

    With `b` omitted, pairs within `a` (i < j). Featureless hashes (`featureless`) pair with nothing: they
    cannot tell images apart, so such images are only ever matched by identical content.
    """
    if a.ndim != 2 or (b is not None and (b.ndim != 2 or a.shape[1] != b.shape[1])):
        raise ValueError("hash arrays must be 2-D with the same number of bytes per row (same hash size)")
    rows_a = np.flatnonzero(~featureless(a))
    rows_b = rows_a if b is None else np.flatnonzero(~featureless(b))
    i, j, d = _hamming_pairs(a[rows_a], None if b is None else b[rows_b], max_distance)
    return rows_a[i], rows_b[j], d


def _hamming_pairs(a: np.ndarray, b: np.ndarray | None, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`near_pairs` on every row. Works on 64-bit words, a block of rows at a time with reused buffers,
    so memory stays bounded and each comparison is a few hardware popcounts."""
    same = b is None
    b = a if same else b
    words_a = _as_words(a).T.copy()  # one contiguous row per 64-bit word
    words_b = words_a if same else _as_words(b).T.copy()
    n_b = words_b.shape[1]
    rows_i, rows_j, dists = [], [], []
    block = max(1, min(len(a), _BLOCK_BYTES // max(1, n_b * 11)))  # 8 + 1 + 2 bytes of buffers per pair
    xor = np.empty(block * n_b, dtype=np.uint64)
    bits = np.empty(block * n_b, dtype=np.uint8)
    total = np.empty(block * n_b, dtype=np.uint16)
    for start in range(0, len(a), block):
        rows = min(block, len(a) - start)
        first = start if same else 0  # within one set, only this block's rows and later ones
        cols = n_b - first
        if cols <= 0:
            break
        x, c, d = (buf[: rows * cols].reshape(rows, cols) for buf in (xor, bits, total))
        d.fill(0)
        for wa, wb in zip(words_a, words_b):
            np.bitwise_xor(wa[start : start + rows, None], wb[None, first:], out=x)
            np.bitwise_count(x, out=c)
            np.add(d, c, out=d)
        keep = d <= max_distance
        if same:
            keep &= np.arange(cols)[None, :] > np.arange(rows)[:, None]  # j > i
        i, j = np.nonzero(keep)
        rows_i.append(i + start)
        rows_j.append(j + first)
        dists.append(d[i, j].astype(np.int32))
    if not rows_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty.astype(np.int32)
    return np.concatenate(rows_i), np.concatenate(rows_j), np.concatenate(dists)


def _as_words(h: np.ndarray) -> np.ndarray:
    """Packed uint8 hashes as rows of uint64 words (zero-padded), for fast XOR and popcount."""
    h = np.ascontiguousarray(h, dtype=np.uint8)
    pad = (-h.shape[1]) % 8
    if pad:
        h = np.concatenate([h, np.zeros((h.shape[0], pad), dtype=np.uint8)], axis=1)
    return h.view(np.uint64)
