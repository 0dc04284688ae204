"""Which photos the rank test's misses come back to: the query, its positive, or a negative ranked above the positive.

A photo that looks like another attribute (filed in the wrong folder, or showing two patterns at once) sits among
that attribute's photos, so it outranks the positive for many of that attribute's queries: a handful of such
photos can decide a large share of the misses. Listing them tells the user which folders to check.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

from ..data.dataset import ImageRecord
from ..data.splits import ComparativeSet

#: At most this many photos are listed, the most involved first ...
LISTED = 8
#: ... and only photos in at least this many misses: a photo in one or two says nothing about the photo.
MIN_MISSES = 3


def misses_of(sets: Sequence[ComparativeSet], above: Sequence[Sequence[int]]) -> list[dict]:
    """The sets whose positive did not come first, with the negatives ranked above it (dataset indices)."""
    return [{"query": s.query, "positive": s.positive, "above": [int(n) for n in a]} for s, a in zip(sets, above) if a]


def photos_behind_misses(misses_by_split: Sequence[Sequence[dict]], images: Sequence[ImageRecord], limit: int = LISTED, min_misses: int = MIN_MISSES) -> dict:
    """The photos that take part in the most misses over all splits, and how.

    Returns {"misses": all misses, "covered": misses at least one listed photo takes part in, "min_misses", "photos": [{"image",
    "path", "attribute", "misses", "as_query", "as_positive", "outranked", "outranked_for": {query attribute: misses},
    "splits"}]}, most misses first.
    """
    roles: dict[int, Counter] = defaultdict(Counter)
    outranked_for: dict[int, Counter] = defaultdict(Counter)
    splits: dict[int, set[int]] = defaultdict(set)
    involved: list[set[int]] = []
    for k, misses in enumerate(misses_by_split):
        for miss in misses:
            roles[miss["query"]]["as_query"] += 1
            roles[miss["positive"]]["as_positive"] += 1
            for n in miss["above"]:
                roles[n]["outranked"] += 1
                outranked_for[n][images[miss["query"]].attribute] += 1
            photos = {miss["query"], miss["positive"], *miss["above"]}
            for i in photos:
                splits[i].add(k)
            involved.append(photos)
    total = {i: sum(r.values()) for i, r in roles.items()}
    listed = [i for i in sorted(total, key=lambda i: (-total[i], images[i].path)) if total[i] >= min_misses][:limit]
    photos = [
        {
            "image": i,
            "path": images[i].path,
            "attribute": images[i].attribute,
            "misses": total[i],
            "as_query": roles[i]["as_query"],
            "as_positive": roles[i]["as_positive"],
            "outranked": roles[i]["outranked"],
            "outranked_for": dict(outranked_for[i].most_common()),
            "splits": len(splits[i]),
        }
        for i in listed
    ]
    return {"misses": len(involved), "covered": sum(1 for p in involved if not p.isdisjoint(listed)), "min_misses": min_misses, "photos": photos}
