"""Train / validation / test assignment and the comparative sets (1 positive + N negatives per query)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import DataConfig
from ..errors import LookalikeError
from .dataset import Dataset

PARTS = ("train", "validation", "test")


@dataclass(frozen=True)
class ComparativeSet:
    """A query image, one image of the same attribute, and images of other attributes (indices into the dataset)."""

    query: int
    positive: int
    negatives: tuple[int, ...]


@dataclass
class Split:
    seed: int
    parts: dict[str, list[int]]
    sets: dict[str, list[ComparativeSet]]
    near_duplicates: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "parts": self.parts,
            "near_duplicates": self.near_duplicates,
            "sets": {p: [asdict(s) | {"negatives": list(s.negatives)} for s in sets] for p, sets in self.sets.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        return cls(
            seed=d["seed"],
            parts={p: list(v) for p, v in d["parts"].items()},
            sets={p: [ComparativeSet(s["query"], s["positive"], tuple(s["negatives"])) for s in v] for p, v in d["sets"].items()},
            near_duplicates=list(d.get("near_duplicates", [])),
        )


def make_split(dataset: Dataset, cfg: DataConfig, seed: int) -> Split:
    """Assign each attribute's images (or whole sub-folders) to parts, then draw the comparative sets.

    Deterministic for a given dataset, config and seed.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {p: [] for p in PARTS}
    for attribute in dataset.attributes:
        units = _units(dataset, attribute, cfg.split_by_subfolder)
        n = len(units)
        if cfg.split_by_subfolder and n < 3:
            raise LookalikeError(
                f"attribute '{attribute}' has {n} sub-folder(s); splitting by sub-folder needs at least 3 "
                "(train, validation, test). Add sub-folders or turn off data.split_by_subfolder"
            )
        order = rng.permutation(n)
        n_train = int(round(cfg.train_ratio * n))
        n_train = min(max(n_train, 2), n - 1)
        n_val = int(round(cfg.validation_ratio * n_train)) if cfg.validation_ratio > 0 else 0
        if cfg.validation_ratio > 0:
            n_val = min(max(n_val, 1), n_train - 1)
        assigned = {"validation": order[:n_val], "train": order[n_val:n_train], "test": order[n_train:]}
        for part, unit_ids in assigned.items():
            for u in sorted(unit_ids):
                parts[part].extend(units[u])
    for part in PARTS:
        parts[part].sort()
    verify_disjoint(dataset, parts)
    near = near_duplicate_leaks(dataset, parts, cfg.near_duplicate_max_distance) if cfg.near_duplicates != "ignore" else []
    if near and cfg.near_duplicates == "refuse":
        raise NearDuplicateLeak(near)
    moved: dict[int, tuple[str, str]] = {}
    for leak in sorted(near, key=lambda x: PARTS.index(x["part_a"])):  # pairs with train first
        moved.setdefault(leak["index_b"], (leak["part_b"], leak["part_a"]))
    for index, (source, target) in moved.items():
        parts[source].remove(index)
        parts[target].append(index)
    for part in PARTS:
        parts[part].sort()
    queries = {
        "train": cfg.train_queries_per_attribute,
        "validation": cfg.validation_queries_per_attribute,
        "test": cfg.test_queries_per_attribute,
    }
    sets = {part: comparative_sets(dataset, parts[part], queries[part], cfg.negatives_per_query, rng) for part in PARTS}
    return Split(seed=seed, parts=parts, sets=sets, near_duplicates=near)


def make_fit_split(dataset: Dataset, cfg: DataConfig, seed: int) -> Split:
    """Every image for training except a validation slice per attribute (calibration, choices); no test part.

    The deployable model is trained this way; `make_split` and the rank test are how it is evaluated.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {p: [] for p in PARTS}
    for attribute in dataset.attributes:
        members = [i for i, im in enumerate(dataset.images) if im.attribute == attribute]
        order = rng.permutation(len(members))
        n_val = min(max(int(round(cfg.validation_ratio * len(members))), 2), len(members) - 2) if cfg.validation_ratio > 0 else 0
        parts["validation"] += [members[i] for i in order[:n_val]]
        parts["train"] += [members[i] for i in order[n_val:]]
    for part in PARTS:
        parts[part].sort()
    verify_disjoint(dataset, parts)
    sets = {
        "train": comparative_sets(dataset, parts["train"], cfg.train_queries_per_attribute, cfg.negatives_per_query, rng),
        "validation": comparative_sets(dataset, parts["validation"], cfg.validation_queries_per_attribute, cfg.negatives_per_query, rng),
        "test": [],
    }
    return Split(seed=seed, parts=parts, sets=sets)


class NearDuplicateLeak(LookalikeError):
    """Near-duplicate images on both sides of the split; `pairs` is the report."""

    def __init__(self, pairs: list[dict]):
        self.pairs = pairs
        shown = "; ".join(f"{p['a']} ~ {p['b']} ({p['part_a']}/{p['part_b']}, {p['distance']} bits)" for p in pairs[:5])
        mislabelled = [p for p in pairs if p["attribute_a"] != p["attribute_b"]]
        conflict = (
            f" {len(mislabelled)} of them carry different attributes (e.g. {mislabelled[0]['a']} and {mislabelled[0]['b']}): "
            "one copy of the photo is in the wrong folder, so move or delete it first."
            if mislabelled
            else ""
        )
        super().__init__(
            f"{len(pairs)} near-duplicate pair(s) straddle the split, which would flatter the evaluation: {shown}"
            f"{' ...' if len(pairs) > 5 else ''}.{conflict} Remove them with `lookalike dedup DATASET`, or set "
            "data.near_duplicates = \"resolve\" to move each pair's later-part image next to its twin"
        )


def near_duplicate_leaks(dataset: Dataset, parts: dict[str, list[int]], max_distance: int) -> list[dict]:
    """Pairs of images in different parts whose difference hashes are within `max_distance` bits."""
    from ..hashing import near_pairs

    hashed = {p: [i for i in parts[p] if dataset.images[i].dhash] for p in PARTS}
    found = []
    for ia, part_a in enumerate(PARTS):
        for part_b in PARTS[ia + 1 :]:
            a, b = hashed[part_a], hashed[part_b]
            if not a or not b:
                continue
            for i, j, d in zip(*near_pairs(_hashes(dataset, a), _hashes(dataset, b), max_distance)):
                found.append({
                    "a": dataset.images[a[i]].path, "b": dataset.images[b[j]].path, "part_a": part_a, "part_b": part_b,
                    "attribute_a": dataset.images[a[i]].attribute, "attribute_b": dataset.images[b[j]].attribute,
                    "distance": int(d), "index_b": int(b[j]),
                })
    return sorted(found, key=lambda x: x["distance"])


def mislabelled_near_duplicates(dataset: Dataset, max_distance: int) -> list[tuple[str, str]]:
    """Near-duplicate pairs filed under different attributes, wherever a split would put them: one copy of each is mislabelled."""
    from ..hashing import near_pairs

    rows = [i for i, im in enumerate(dataset.images) if im.dhash]
    if len(rows) < 2:
        return []
    pairs = zip(*near_pairs(_hashes(dataset, rows), None, max_distance)[:2])
    return [(dataset.images[rows[i]].path, dataset.images[rows[j]].path) for i, j in pairs if dataset.images[rows[i]].attribute != dataset.images[rows[j]].attribute]


def _hashes(dataset: Dataset, rows: list[int]) -> np.ndarray:
    """The packed difference hashes of these images, one row each."""
    return np.array([np.frombuffer(bytes.fromhex(dataset.images[i].dhash), np.uint8) for i in rows])


def comparative_sets(dataset: Dataset, members: list[int], queries_per_attribute: int, n_negatives: int, rng: np.random.Generator) -> list[ComparativeSet]:
    """Up to `queries_per_attribute` queries per attribute, each with 1 positive and up to `n_negatives` negatives."""
    by_attribute: dict[str, list[int]] = defaultdict(list)
    for i in members:
        by_attribute[dataset.images[i].attribute].append(i)
    out: list[ComparativeSet] = []
    for attribute in sorted(by_attribute):
        same = by_attribute[attribute]
        if len(same) < 2:
            continue
        others = np.array([i for i in members if dataset.images[i].attribute != attribute], dtype=np.int64)
        if len(others) == 0:
            continue
        chosen = rng.choice(len(same), size=min(queries_per_attribute, len(same)), replace=False)
        for q in sorted(chosen):
            query = same[q]
            positive = same[(q + 1 + rng.integers(len(same) - 1)) % len(same)]
            negatives = rng.choice(others, size=min(n_negatives, len(others)), replace=False)
            out.append(ComparativeSet(query, positive, tuple(int(n) for n in negatives)))
    return out


def verify_disjoint(dataset: Dataset, parts: dict[str, list[int]]) -> None:
    """Refuse to go on if any two parts share an image, by path or by content hash."""
    for i, a in enumerate(PARTS):
        for b in PARTS[i + 1 :]:
            for key in ("path", "sha256"):
                va = {getattr(dataset.images[j], key): j for j in parts.get(a, [])}
                shared = [va[getattr(dataset.images[j], key)] for j in parts.get(b, []) if getattr(dataset.images[j], key) in va]
                if shared:
                    example = dataset.images[shared[0]].path
                    raise LookalikeError(
                        f"{a} and {b} share {len(shared)} image(s) by {key} (e.g. {example}); "
                        "the evaluation would be dishonest. Remove duplicate files from the dataset and run prepare again"
                    )


def _units(dataset: Dataset, attribute: str, by_subfolder: bool) -> list[list[int]]:
    members = [i for i, im in enumerate(dataset.images) if im.attribute == attribute]
    if not by_subfolder:
        return [[i] for i in members]
    groups: dict[str, list[int]] = defaultdict(list)
    for i in members:
        groups[dataset.images[i].group].append(i)
    return [groups[g] for g in sorted(groups)]
